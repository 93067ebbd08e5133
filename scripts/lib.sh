# shellcheck shell=bash
# Shared helpers for domdma's scripts: progress output and host prerequisites.
# Sourced, not executed.

DOMDMA_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export DOMDMA_ROOT

# Guest binaries run in a busybox initramfs: link them statically against glibc. The
# explicit --target keeps these RUSTFLAGS off the host builds (and their cache).
DOMDMA_TARGET_DIR=${CARGO_TARGET_DIR:-$DOMDMA_ROOT/target}
DOMDMA_GUEST_TARGET=x86_64-unknown-linux-gnu
DOMDMA_GUEST_BIN="$DOMDMA_TARGET_DIR/$DOMDMA_GUEST_TARGET/release/domdma-guest-tests"
export DOMDMA_TARGET_DIR DOMDMA_GUEST_TARGET DOMDMA_GUEST_BIN

if [[ -t 1 ]]; then _b=$'\e[1m' _r=$'\e[0m'; else _b='' _r=''; fi

# step MESSAGE: announce what the script is about to do.
step() { printf '%s==> %s%s\n' "$_b" "$*" "$_r"; }

# die MESSAGE: fail with a message naming the problem and the fix.
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# apt_install PKG...: install missing host packages (Debian/Ubuntu), as root or via sudo.
apt_install() {
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  step "installing host packages: ${missing[*]}"
  local sudo=()
  [[ $(id -u) -eq 0 ]] || sudo=(sudo)
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

# ensure_host_tools: what building and running the suite needs on the host.
ensure_host_tools() {
  command -v cargo >/dev/null || die "cargo not found: install Rust (https://rustup.rs) and retry"
  # libc6-dev: static glibc for the guest binary; openssh-client: the SSH driver;
  # debian-archive-keyring: verifies the Debian packages QEMU and the guest come from.
  apt_install libc6-dev openssh-client debian-archive-keyring
}

# ensure_browser: a headless browser for the web view's test (device/tests/webview.rs),
# Debian's chromium when none is installed (GitHub's Ubuntu runners have google-chrome).
ensure_browser() {
  if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null &&
    ! command -v google-chrome >/dev/null; then
    apt_install chromium
  fi
  command -v chromium >/dev/null || command -v chromium-browser >/dev/null ||
    command -v google-chrome >/dev/null ||
    die "no headless browser after installing chromium: install Debian's chromium package and retry"
}

# ensure_rust_components COMPONENT...: rustfmt/clippy, through rustup when missing.
ensure_rust_components() {
  local c
  for c in "$@"; do
    if ! cargo "${c/rustfmt/fmt}" --version >/dev/null 2>&1; then
      step "adding the Rust component $c"
      rustup component add "$c" || die "cannot add the Rust component $c: install it with 'rustup component add $c'"
    fi
  done
}

# check_workflows: validate .github/workflows/*.yml against GitHub's workflow schema with
# check-jsonschema (from PyPI, pinned, installed once into the cache; the schema ships with it).
CHECK_JSONSCHEMA_VERSION=0.33.0
check_workflows() {
  local cache=${DOMDMA_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/domdma}
  local dir=$cache/pytools/check-jsonschema-$CHECK_JSONSCHEMA_VERSION
  if [[ ! -x $dir/bin/check-jsonschema ]]; then
    python3 -m pip --version >/dev/null 2>&1 || apt_install python3 python3-pip
    step "installing check-jsonschema $CHECK_JSONSCHEMA_VERSION from PyPI into $dir"
    rm -rf "$dir"
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --target "$dir" \
      "check-jsonschema==$CHECK_JSONSCHEMA_VERSION" ||
      die "cannot install check-jsonschema with pip: install python3-pip and retry"
  fi
  PYTHONPATH=$dir "$dir/bin/check-jsonschema" --builtin-schema vendor.github-workflows \
    "$DOMDMA_ROOT"/.github/workflows/*.yml
}

# build_all: release builds of the device server and runner, and the static guest suite.
build_all() {
  step "building the device server and the host runner (release)"
  cargo build --release --locked -p domdma-device -p domdma-qemu
  step "building the guest test suite (static, $DOMDMA_GUEST_TARGET)"
  # Stripped of debuginfo: the binary is copied into the guest over SSH on every run.
  RUSTFLAGS="-C target-feature=+crt-static -C strip=debuginfo" \
    cargo build --release --locked --target "$DOMDMA_GUEST_TARGET" -p domdma-guest-tests
}

# profile_names: the guest profiles (qemu/profiles/*.toml), the default (numa) first.
profile_names() {
  local f names=()
  for f in "$DOMDMA_ROOT"/qemu/profiles/*.toml; do
    names+=("$(basename "$f" .toml)")
  done
  printf '%s\n' numa
  printf '%s\n' "${names[@]}" | grep -vx numa | sort
}

# run_guest_suite PROFILE|all [RUNNER ARGS...]: provision, build, then for each profile boot
# the device + QEMU and run the guest suite (profiles concurrently, $DOMDMA_JOBS at a time,
# default 2); one table at the end and a merged target/domdma/guest/junit.xml. With --bench
# among the runner args: the guest bench, one profile at a time, each profile's table shown.
run_guest_suite() {
  local spec=$1
  shift
  local profiles=()
  if [[ $spec == all ]]; then
    mapfile -t profiles < <(profile_names)
  else
    [[ -f $DOMDMA_ROOT/qemu/profiles/$spec.toml ]] ||
      die "unknown profile '$spec': use one of $(profile_names | tr '\n' ' ')or all"
    profiles=("$spec")
  fi
  step "provisioning QEMU and the guest image (cached)"
  # --print-env provisions what is missing (progress on stderr), then prints the env file.
  # Captured first, so that a failed provision stops here (a process substitution would
  # drop its exit status).
  local env_file
  env_file=$("$DOMDMA_ROOT/scripts/provision" --print-env) || die "provisioning failed (see the messages above)"
  set -a
  eval "$env_file"
  set +a
  build_all
  local out=$DOMDMA_ROOT/target/domdma/guest jobs=${DOMDMA_JOBS:-2} start=$SECONDS p bench=0
  mkdir -p "$out"
  for p in "$@"; do [[ $p != --bench ]] || bench=1; done
  # Measurements share nothing: bench runs go one at a time.
  [[ $bench -eq 0 ]] || jobs=1
  run_one() {
    "$DOMDMA_TARGET_DIR/release/domdma-vm" run \
      --device-bin "$DOMDMA_TARGET_DIR/release/domdma-device" \
      --guest-bin "$DOMDMA_GUEST_BIN" \
      --profile "$DOMDMA_ROOT/qemu/profiles/$1.toml" \
      --out "$out/$1" \
      "${@:2}"
  }
  if [[ ${#profiles[@]} -eq 1 ]]; then
    step "running profile ${profiles[0]} with QEMU $DOMDMA_QEMU_VERSION (device server beside it, suite over SSH)"
    run_one "${profiles[0]}" "$@" || true
  else
    step "running profiles ${profiles[*]} with QEMU $DOMDMA_QEMU_VERSION, $jobs at a time (logs: $out/PROFILE/runner.log)"
    local running=0
    for p in "${profiles[@]}"; do
      mkdir -p "$out/$p"
      (
        if run_one "$p" "$@" >"$out/$p/runner.log" 2>&1; then
          echo "    profile $p: passed"
        else
          echo "    profile $p: FAILED (see $out/$p/runner.log)"
        fi
      ) &
      running=$((running + 1))
      if [[ $running -ge $jobs ]]; then
        wait -n || true
        running=$((running - 1))
      fi
    done
    wait
  fi
  if [[ $bench -eq 1 && ${#profiles[@]} -gt 1 ]]; then
    for p in "${profiles[@]}"; do
      step "guest bench, profile $p ($out/$p/bench.json)"
      cat "$out/$p/bench.txt" 2>/dev/null || echo "    no bench report (see $out/$p/runner.log)"
    done
  fi
  step "guest profiles"
  "$DOMDMA_TARGET_DIR/release/domdma-vm" summary --out "$out" --wall "$((SECONDS - start))" "${profiles[@]}"
}
