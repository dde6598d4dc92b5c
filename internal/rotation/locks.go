package rotation

import "sync"

// tunnelLocks gives every tunnel a mutex of its own, made on first use and
// dropped once nobody holds or waits for it, so memory follows the tunnels
// in use, not the tunnels managed.
//
// A tunnel's lock is its own and no other tunnel's: readers and the
// background only try a lock and pass over a tunnel whose lock is taken (a
// rotation in flight). Striped locks, where tunnels that hash alike share
// one, made a rotation of one tunnel hide every tunnel of its stripe from
// reads and the drift sweep: with a bulk job running, most of them.
type tunnelLocks struct {
	mu    sync.Mutex
	locks map[string]*tunnelLock
}

// tunnelLock is one tunnel's mutex and how many callers hold or wait for it
// (refs, guarded by tunnelLocks.mu).
type tunnelLock struct {
	sync.Mutex
	refs int
}

func newTunnelLocks() *tunnelLocks { return &tunnelLocks{locks: map[string]*tunnelLock{}} }

// lock takes key's lock, waiting for it, and returns its release.
func (l *tunnelLocks) lock(key string) (unlock func()) {
	entry := l.acquire(key)
	entry.Lock()
	return func() { l.release(key, entry) }
}

// tryLock takes key's lock if it is free and returns its release; ok is
// false, and nothing is held, when another caller has it.
func (l *tunnelLocks) tryLock(key string) (unlock func(), ok bool) {
	entry := l.acquire(key)
	if !entry.TryLock() {
		l.drop(key, entry)
		return nil, false
	}
	return func() { l.release(key, entry) }, true
}

// acquire counts a caller in on key's mutex, making it if needed.
func (l *tunnelLocks) acquire(key string) *tunnelLock {
	l.mu.Lock()
	defer l.mu.Unlock()
	entry := l.locks[key]
	if entry == nil {
		entry = &tunnelLock{}
		l.locks[key] = entry
	}
	entry.refs++
	return entry
}

// release unlocks key's mutex and counts its holder out.
func (l *tunnelLocks) release(key string, entry *tunnelLock) {
	entry.Unlock()
	l.drop(key, entry)
}

// drop counts a caller out of key's mutex, forgetting the mutex when it was
// the last.
func (l *tunnelLocks) drop(key string, entry *tunnelLock) {
	l.mu.Lock()
	defer l.mu.Unlock()
	entry.refs--
	if entry.refs == 0 {
		delete(l.locks, key)
	}
}

// holders is how many callers hold or wait for key's lock.
func (l *tunnelLocks) holders(key string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	if entry := l.locks[key]; entry != nil {
		return entry.refs
	}
	return 0
}

// size is how many tunnels' mutexes exist now (held or waited for).
func (l *tunnelLocks) size() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.locks)
}
