#!/usr/bin/env bash
# Runs the whole test suite, on a fresh Debian machine too: installs the
# programs the integration tests run when they are missing (apt-get, with
# sudo when not root) and the bcoin nodes of tests/bcoin_sync.rs (npm, from
# tests/bcoin/package-lock.json into the git-ignored tests/bcoin/node_modules),
# then runs `cargo test --locked --all-targets` with any extra arguments
# passed through, e.g. `./test.sh -- --nocapture`.
# .ci/run calls this script; a test that finds one of these programs missing
# fails and names this script.
set -euo pipefail
cd "$(dirname "$0")"

# Debian installs tor in /usr/sbin, which is not on a normal user's PATH.
PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

# program:package, and the test that runs it.
programs=(
    microsocks:microsocks      # upstream SOCKS5 server (tests/upstream.rs)
    proxychains4:proxychains4  # a client with no proxy option (tests/proxychains.rs)
    python3:python3            # the plain-socket client proxychains4 wraps
    chromium:chromium          # renders the status page (tests/status_page.rs)
    tor:tor                    # real Tor as the upstream, offline (tests/tor.rs)
    kill:procps                # signals the binary (tests/binary.rs)
    ip:iproute2                # network namespaces (tests/security.rs, tests/inbound_netns.rs)
    cc:gcc                     # build scripts of ring and secp256k1
    node:nodejs                # runs two real bcoin nodes (tests/bcoin_sync.rs)
    npm:npm                    # installs bcoin from tests/bcoin/package-lock.json
)

if ! command -v cargo >/dev/null; then
    echo "cargo is not installed: install Rust from https://rustup.rs, then rerun $0" >&2
    exit 1
fi

missing=()
for entry in "${programs[@]}"; do
    command -v "${entry%%:*}" >/dev/null || missing+=("${entry#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}" >&2
    if ! command -v apt-get >/dev/null; then
        echo "no apt-get here: install these packages, then rerun $0: ${missing[*]}" >&2
        exit 1
    fi
    sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        if ! command -v sudo >/dev/null; then
            echo "not root and no sudo: install these packages as root, then rerun $0: ${missing[*]}" >&2
            exit 1
        fi
        sudo=(sudo)
    fi
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "${missing[@]}"
    if [[ " ${missing[*]} " == *" tor "* ]]; then
        echo "note: Debian's tor package enables its system service; the tests start their own" \
            "offline Tor and do not need it (\`sudo systemctl disable --now tor\` stops it)" >&2
    fi
fi

# bcoin 1.0.2, exactly as locked; its install scripts would fetch prebuilt
# binaries from outside the registry and are not needed: the nodes use
# bcoin's pure-JS backend with the chain in memory. Reinstalled only when the
# lock file is newer than the installed tree.
bcoin=tests/bcoin
if [ ! -f "$bcoin/node_modules/.package-lock.json" ] ||
    [ "$bcoin/package-lock.json" -nt "$bcoin/node_modules/.package-lock.json" ]; then
    echo "installing bcoin into $bcoin/node_modules (npm ci)" >&2
    (cd "$bcoin" && npm ci --ignore-scripts --no-audit --no-fund)
fi

exec cargo test --locked --all-targets "$@"
