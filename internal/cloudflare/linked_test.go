package cloudflare

import (
	"debug/elf"
	"debug/gosym"
	"os"
	"reflect"
	"strings"
	"testing"
)

// TestTheSDKsOtherServicesStayUnlinked guards the size of the plugin.
// SetPSKs calls the SDK's generic client, whose type holds a field for every
// Cloudflare service. The plugin's linker keeps every exported method of a
// type that can reach an interface, since the program calls methods by name
// through reflection (Vault's SDK does); a Client that held the generic
// client in a field brought every service of the SDK with it, and the plugin
// grew from 52 to 110 MB. This test binary is linked the same way, so it
// looks in its own function table for a method of a service nothing here
// uses (zones).
func TestTheSDKsOtherServicesStayUnlinked(t *testing.T) {
	// What puts the plugin's linker in that mode: a *Client in an
	// interface, and a method called by a name known only at run time.
	_ = reflect.ValueOf(&Client{}).MethodByName(os.Getenv("NO_SUCH_METHOD_NAME"))
	exe, err := os.Executable()
	if err != nil {
		t.Skipf("no executable to read: %v", err)
	}
	f, err := elf.Open(exe)
	if err != nil {
		t.Skipf("not an ELF binary: %v", err)
	}
	defer f.Close()
	// The runtime's own function table: kept when go test strips the
	// symbol table.
	pclntab, text := f.Section(".gopclntab"), f.Section(".text")
	if pclntab == nil || text == nil {
		t.Skip("the binary has no Go function table")
	}
	data, err := pclntab.Data()
	if err != nil {
		t.Fatal(err)
	}
	table, err := gosym.NewTable(nil, gosym.NewLineTable(data, text.Addr))
	if err != nil {
		t.Skipf("the function table cannot be read: %v", err)
	}
	const unused = "github.com/cloudflare/cloudflare-go/v6/zones.(*ZoneService)."
	var sawSDK bool
	for _, fn := range table.Funcs {
		sawSDK = sawSDK || strings.HasPrefix(fn.Name, "github.com/cloudflare/cloudflare-go/v6/magic_transit.")
		if strings.HasPrefix(fn.Name, unused) {
			t.Fatalf("%s is linked in, and with it every service of the SDK: something that can reach an interface holds the SDK's generic client (see SetPSKs)", fn.Name)
		}
	}
	if !sawSDK {
		t.Fatal("the function table does not name the SDK's packages: this test cannot see what it looks for")
	}
}
