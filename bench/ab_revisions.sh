#!/usr/bin/env bash
# Run one apparate command on two revisions, interleaved (A B A B ...), to compare speed before
# and after a change on a noisy machine. The old revision is checked out in a temporary worktree
# and imported from its src/ (nothing is installed); the new one is this checkout.
#
#   bash bench/ab_revisions.sh REV "bench simspeed --policies vanilla,apparate --repeats 3" [PAIRS]
#
# Prints each run's markdown table rows, labelled before/after. Run nothing else meanwhile.
set -euo pipefail
rev=${1:?usage: ab_revisions.sh REV "apparate args" [PAIRS]}
args=${2:?usage: ab_revisions.sh REV "apparate args" [PAIRS]}
pairs=${3:-3}
root=$(cd "$(dirname "$0")/.." && pwd)
old=$(mktemp -d /tmp/apparate-ab.XXXXXX)
trap 'git -C "$root" worktree remove --force "$old" >/dev/null 2>&1 || rm -rf "$old"' EXIT
git -C "$root" worktree add --detach --force "$old" "$rev" >/dev/null 2>&1
echo "# before: $(git -C "$old" log --oneline -1)"
echo "# after:  $(git -C "$root" log --oneline -1)$(git -C "$root" diff --quiet || echo ' + uncommitted changes')"
echo "# command: apparate $args; $pairs interleaved pairs; $(nproc) cores"
for i in $(seq "$pairs"); do
  for side in before after; do
    src=$([ "$side" = before ] && echo "$old/src" || echo "$root/src")
    echo "== $side $i"
    # shellcheck disable=SC2086
    PYTHONPATH="$src" python -m apparate $args 2>&1 | grep -E '^\|' | grep -vE '^\|[- |]+\|$' || true
  done
done
