#!/usr/bin/env bash
# The accelerator-compiler environments: two venvs, outside the clone, that compile memjax for real
# TPU (libtpu / Mosaic) and NVIDIA GPU (XLA GPU + Triton + ptxas) targets on a machine with neither
# (deviceless AOT; /work/shared/docs/jax-notes.md). Created once, then reused.
#
#   .ci/aot_env.sh              both; prints two lines: the TPU python, then the CUDA python
#   .ci/aot_env.sh tpu|cuda     one of them; prints its python
#
# Layout: ${MEMJAX_AOT_HOME:-$HOME/.cache/memjax/aot}/<key>/{tpu,cuda}, where <key> is a sha256 of
# the JAX pins in pyproject.toml (the jax== and jaxlib== lines) and of the extras below, so a pin
# change builds new venvs beside the old ones (delete old keys by hand). A venv counts as built only
# once its stamp file is written, after a successful import check; an interrupted build is removed and
# redone on the next call. Concurrent calls (two CI jobs) are serialised by flock on the key folder.
# memjax itself is installed editable (its dependencies once; later calls from another clone only
# re-point the editable install, with --no-deps). Scripts that must use the calling clone's code
# whatever the venv points at should put the clone first on sys.path (benchmarks/kernel_compile.py
# does). Everything goes through pip and the package registries; stdout carries only the paths, pip's
# output goes to stderr.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
pins=$(grep -E '^[[:space:]]*"(jax|jaxlib)==' "$repo/pyproject.toml" | tr -d ' ",' | sort)
jax_version=$(sed -n 's/^jax==//p' <<<"$pins")
if [[ -z "$jax_version" ]]; then
  echo "aot_env: no jax== pin found in $repo/pyproject.toml" >&2
  exit 1
fi
# The same requirements as pyproject.toml's aot-tpu / aot-cuda extras.
declare -A extra=([tpu]="jax[tpu]==$jax_version" [cuda]="jax[cuda12]==$jax_version")
key=$(printf '%s\n' "$pins" "${extra[tpu]}" "${extra[cuda]}" | sha256sum | cut -c1-16)
home=${MEMJAX_AOT_HOME:-$HOME/.cache/memjax/aot}/$key
py=${PYTHON:-python3}

targets=("$@")
[[ ${#targets[@]} -eq 0 ]] && targets=(tpu cuda)
for t in "${targets[@]}"; do
  [[ -n "${extra[$t]:-}" ]] || { echo "aot_env: unknown target '$t' (tpu or cuda)" >&2; exit 2; }
done

export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
mkdir -p "$home"
exec 9>"$home/.lock"
flock 9

# The import check: the platform's compiler plugin is present (no device is needed or asked for).
declare -A probe=(
  [tpu]='import jax, libtpu; print("jax", jax.__version__, "libtpu", getattr(libtpu, "__version__", "?"))'
  [cuda]='import jax, jax_plugins.xla_cuda12 as p; print("jax", jax.__version__, "cuda plugin", p.__name__)'
)

build() {  # build <target>: (re)creates the venv of <target> unless its stamp is there
  local t=$1 dir=$home/$1 start
  if [[ -f "$dir/.memjax-aot-stamp" && -x "$dir/bin/python" ]]; then
    # Reused: point the editable memjax at this clone if another clone installed it.
    if [[ "$(cat "$dir/.memjax-aot-repo" 2>/dev/null)" != "$repo" ]]; then
      "$dir/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$repo" >&2
      echo "$repo" >"$dir/.memjax-aot-repo"
    fi
    return
  fi
  start=$(date +%s)
  echo "aot_env: building $dir (${extra[$t]} + memjax's dependencies)" >&2
  rm -rf "$dir"
  "$py" -m venv "$dir"
  "$dir/bin/python" -m pip install -q --upgrade pip setuptools >&2
  "$dir/bin/python" -m pip install "${extra[$t]}" >&2
  # memjax's dependencies around the jax already there (pip keeps what satisfies the pins).
  "$dir/bin/python" -m pip install --no-build-isolation -e "$repo" >&2
  JAX_PLATFORMS=cpu "$dir/bin/python" -c "${probe[$t]}" >&2
  echo "$repo" >"$dir/.memjax-aot-repo"
  {
    echo "target=$t"
    echo "requirement=${extra[$t]}"
    echo "pins=$(tr '\n' ' ' <<<"$pins")"
    echo "built=$(date -u +%FT%TZ)"
    echo "install_seconds=$(( $(date +%s) - start ))"
  } >"$dir/.memjax-aot-stamp"
  echo "aot_env: built $t in $(( $(date +%s) - start )) s, $(du -sh "$dir" | cut -f1)" >&2
}

for t in "${targets[@]}"; do
  build "$t"
done
for t in "${targets[@]}"; do
  echo "$home/$t/bin/python"
done
