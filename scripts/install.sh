#!/usr/bin/env bash
# Install chainfs: the binary, the mount helper, man pages and shell
# completions, under PREFIX (default /usr/local), staged under DESTDIR if set.
#
#   scripts/install.sh                      build (release) and install
#   PREFIX=/usr scripts/install.sh          install into /usr
#   DESTDIR=/tmp/pkg scripts/install.sh     stage for a package
#   scripts/install.sh --bin PATH           install an already built binary
#   scripts/install.sh --uninstall          remove exactly what was installed
#
# Installed (paths under DESTDIR/PREFIX):
#   bin/chainfs                                       the command
#   sbin/mount.fuse.chainfs -> ../bin/chainfs         mount(8) helper name
#   share/man/man1/chainfs.1, chainfs-COMMAND.1       man pages
#   share/bash-completion/completions/chainfs         bash completion
#   share/zsh/site-functions/_chainfs                 zsh completion
#   share/fish/vendor_completions.d/chainfs.fish      fish completion
#   share/chainfs/install-manifest                    what --uninstall removes
#
# `mount -t fuse.chainfs` and fstab lines need `chainfs` on the default PATH
# of /bin/sh (mount.fuse3 runs it from there): /usr/local/bin and /usr/bin
# are. mount(8) runs sbin/mount.fuse.chainfs itself only from /sbin, that is
# with PREFIX=/usr.
set -euo pipefail
cd "$(dirname "$0")/.."

PREFIX=${PREFIX:-/usr/local}
DESTDIR=${DESTDIR:-}
ROOT="$DESTDIR$PREFIX"
MANIFEST="$ROOT/share/chainfs/install-manifest"
BIN=""
UNINSTALL=0
while [ $# -gt 0 ]; do
  case "$1" in
    --uninstall) UNINSTALL=1 ;;
    --bin)
      [ $# -ge 2 ] || { echo "install.sh: --bin needs a PATH" >&2; exit 2; }
      BIN=$2
      shift
      ;;
    -h | --help)
      sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'
      exit 0
      ;;
    *) echo "install.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

# Remove the files a manifest lists, then the folders it lists that
# install.sh created (only when empty), then the manifest; nothing else.
uninstall() {
  if [ ! -f "$MANIFEST" ]; then
    echo "install.sh: $MANIFEST not found: nothing installed here by install.sh" >&2
    return 1
  fi
  local kind rel dirs=()
  while read -r kind rel; do
    [ -n "$rel" ] || continue
    case "$rel" in
      /* | *..*) echo "install.sh: $MANIFEST: refusing odd entry $rel" >&2; return 1 ;;
    esac
    case "$kind" in
      file)
        if [ -f "$ROOT/$rel" ] || [ -L "$ROOT/$rel" ]; then
          rm -f -- "$ROOT/$rel"
          echo "removed $ROOT/$rel"
        fi
        ;;
      dir) dirs+=("$rel") ;;
    esac
  done <"$MANIFEST"
  rm -f -- "$MANIFEST"
  # Deepest first; a folder something else has put files into stays.
  local i
  for ((i = ${#dirs[@]} - 1; i >= 0; i--)); do
    rmdir -- "$ROOT/${dirs[i]}" 2>/dev/null || true
  done
}

if [ "$UNINSTALL" = 1 ]; then
  uninstall
  exit 0
fi

if [ -z "$BIN" ]; then
  # The binary cargo reports it built (honours CARGO_TARGET_DIR).
  BIN=$(cargo build --release --locked --quiet --message-format=json-render-diagnostics |
    grep -F '"kind":["bin"]' | grep -F '"name":"chainfs"' |
    sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1)
fi
if [ -z "$BIN" ] || [ ! -x "$BIN" ]; then
  echo "install.sh: no chainfs binary (${BIN:-cargo reported none})" >&2
  exit 1
fi

# A reinstall first takes away what the last install put there.
[ -f "$MANIFEST" ] && uninstall >/dev/null

STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
"$BIN" manpages "$STAGE/man" >/dev/null
"$BIN" completions bash >"$STAGE/chainfs.bash"
"$BIN" completions zsh >"$STAGE/_chainfs"
"$BIN" completions fish >"$STAGE/chainfs.fish"

installed=() # "file REL" and "dir REL" lines, in the order made
folder() { # folder REL: make it, noting each level install.sh creates
  local d=$1 new=()
  while [ "$d" != . ] && [ ! -d "$ROOT/$d" ]; do
    new=("$d" "${new[@]}")
    d=$(dirname "$d")
  done
  mkdir -p "$ROOT/$1"
  for d in "${new[@]}"; do installed+=("dir $d"); done
}
put() { # put MODE SOURCE REL
  folder "$(dirname "$3")"
  install -m "$1" "$2" "$ROOT/$3"
  installed+=("file $3")
  echo "installed $ROOT/$3"
}
put 755 "$BIN" bin/chainfs
folder sbin
ln -sfn ../bin/chainfs "$ROOT/sbin/mount.fuse.chainfs"
installed+=("file sbin/mount.fuse.chainfs")
echo "installed $ROOT/sbin/mount.fuse.chainfs -> ../bin/chainfs"
for page in "$STAGE"/man/*.1; do
  put 644 "$page" "share/man/man1/$(basename "$page")"
done
put 644 "$STAGE/chainfs.bash" share/bash-completion/completions/chainfs
put 644 "$STAGE/_chainfs" share/zsh/site-functions/_chainfs
put 644 "$STAGE/chainfs.fish" share/fish/vendor_completions.d/chainfs.fish
folder share/chainfs
printf '%s\n' "${installed[@]}" >"$MANIFEST"
echo "installed $MANIFEST (scripts/install.sh --uninstall removes these files)"
