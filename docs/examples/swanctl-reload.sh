#!/bin/sh
# Vault Agent runs this after each render of swanctl.conf.tpl (the exec of
# agent.hcl's strongSwan template), with Agent's environment (CF_TUNNEL_IDS).
#
# Loading the new key is not always enough. Cloudflare uses a new key at
# once for a new handshake, and does not document whether it also deletes an
# established IKE SA (IKEv2 rekeying does not authenticate again, so the SA
# may well survive). If it deletes it, the tunnel is down: strongSwan does not
# retry an authentication that failed, and reloading a connection that did
# not change does not start it again. So after loading, this starts each of
# the site's tunnels (cf1, cf2, ... in CF_TUNNEL_IDS order, as the template
# names them) that has no IKE SA. A connection that is new, or changed, is
# started by its start_action as it is loaded, so only those loaded before
# are started here. A tunnel that is still up is left alone: loading the key
# and an unchanged connection does not touch its SA, so a rotation costs it
# nothing (dpd_action restarts it, with the key loaded by then, if Cloudflare
# drops it later).
#
# The exit status: Vault Agent stops when this exits non-zero. So it does
# when the file cannot be loaded (as exit_on_retry_failure stops Agent on a
# template that cannot render), not when a tunnel does not come up: Agent
# must keep running to render the next key. A CHILD_SA can fail where the
# IKE SA, and the key, worked (a kernel without ESP: NO_PROPOSAL_CHOSEN).
#
# e2e/ikev2_test.go runs this script against a real strongSwan peer.
set -u
before=$(swanctl --list-conns --raw) || exit 1
swanctl --load-creds || exit 1
swanctl --load-conns || exit 1
n=$(printf '%s\n' "${CF_TUNNEL_IDS:?}" | tr ',' '\n' | grep -c '[^[:space:]]')
i=1
while [ "$i" -le "$n" ]; do
  conn="cf$i"
  case "$before" in
  *"{$conn {"*)
    if ! swanctl --list-sas --ike "$conn" --raw | grep -q "{$conn {"; then
      swanctl --initiate --child "$conn" --timeout 15 ||
        echo "swanctl-reload.sh: $conn did not come up entirely (see above)" >&2
    fi
    ;;
  esac
  i=$((i + 1))
done
exit 0
