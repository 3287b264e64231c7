#!/usr/bin/env bash
# A bad RINGTREE_KERNEL_PATH stops a program at start with one message naming
# the variable: attnserve under `mpirun -np 2` (non-zero exit, no port file,
# no hang), and the Python module's import (ImportError, not exit 2 from the
# first kernel call).   usage: bad_kernel_path.sh ATTNSERVE PYTHON_BUILD_DIR
set -u
attnserve=$1
pydir=$2
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
fail() {
  echo "FAIL: $*"
  exit 1
}

out=$(RINGTREE_KERNEL_PATH=bogus timeout 120 mpirun -np 2 --oversubscribe --bind-to none \
  "$attnserve" --listen 127.0.0.1:0 --port-file "$dir/port" 2>&1)
rc=$?
echo "$out"
[ "$rc" -ne 124 ] || fail "attnserve did not stop within 120 s"
[ "$rc" -ne 0 ] || fail "attnserve exited 0"
[ ! -e "$dir/port" ] || fail "attnserve wrote its port file"
n=$(grep -c "RINGTREE_KERNEL_PATH='bogus' is not one of" <<<"$out")
[ "$n" -eq 1 ] || fail "expected one message naming RINGTREE_KERNEL_PATH, saw $n"

out=$(RINGTREE_KERNEL_PATH=bogus timeout 120 /usr/bin/python3 -c \
  "import sys; sys.path.insert(0, '$pydir'); import ringtree_mpi" 2>&1)
rc=$?
echo "$out"
grep -q "ImportError: RINGTREE_KERNEL_PATH='bogus' is not one of" <<<"$out" ||
  fail "the import did not raise ImportError naming RINGTREE_KERNEL_PATH"
[ "$rc" -eq 1 ] || fail "python exited $rc (an uncaught exception exits 1)"
echo "OK: both stopped at start with one message"
