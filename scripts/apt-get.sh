#!/bin/sh
# apt-get ARGS..., waiting (bounded, APT_LOCK_WAIT seconds, default 600) while
# another apt or dpkg holds its lock -- unattended upgrades on a fresh machine,
# say -- instead of failing at once. DPkg::Lock::Timeout covers the dpkg lock;
# the loop covers the package lists' lock, which that option does not.
set -eu
limit=${APT_LOCK_WAIT:-600}
waited=0
while :; do
    if out=$(DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=60 "$@" 2>&1); then
        exit 0
    fi
    case "$out" in
    *"Could not get lock"* | *"Unable to acquire"* | *"is held by process"*)
        if [ "$waited" -ge "$limit" ]; then
            echo "apt-get: its lock is still held after ${limit}s; run this again once the other apt has finished" >&2
            exit 1
        fi
        [ "$waited" -eq 0 ] && echo "apt-get: another apt holds the lock; waiting up to ${limit}s" >&2
        sleep 5
        waited=$((waited + 5))
        ;;
    *)
        printf '%s\n' "$out" >&2
        exit 1
        ;;
    esac
done
