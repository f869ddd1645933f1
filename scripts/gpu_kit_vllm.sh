#!/usr/bin/env bash
# The GPU machine's kit WITH vLLM: ../shared/tools/gpu-kit's chunks (dagster, boto3, gguf, SmolLM2 weights, ARC) plus
# vLLM 0.24.0 and the packages its offline engine imports that the machine's image lacks, in chunks that travel.
#
# Why a project script: vLLM is the generation backend users pick on a GPU (issue 17), the machine has no registry,
# and one call carries at most 64 MiB with the working tree. vLLM 0.24.0 is the newest that pins the machine's
# torch (2.11.0); its wheel is 266 MB, so this script drops what an H200 never loads and recompresses:
#   - vllm_flash_attn/_vllm_fa2_C (FlashAttention 2): on SM90 vLLM picks FA3 (v1/attention/backends/fa_utils.py),
#   - _moe_C (mixture-of-experts kernels; imported under contextlib.suppress in _custom_ops.py): dense models only,
#   - vllm-rs (the Rust HTTP frontend), third_party/fmha_sm100 (Blackwell), deep_gemm builds for other Pythons.
# The dependency list was found by importing vLLM's offline engine modules (entrypoints.llm, v1.engine.core,
# v1.worker.gpu_model_runner, lora, llama/qwen2 models, the FA backend) with every package the image lacks blocked
# (KINDS.md's list): cbor2 msgspec pyzmq pybase64 cachetools openai 2.x (+distro jiter sniffio; 3.x needs httpx2, which the image lacks) openai-harmony llguidance
# xgrammar(+apache-tvm-ffi) fastapi starlette partial-json-parser; setproctitle blake3 depyf(+astor) are imported
# by the engine process at run time. flashinfer is optional in vLLM (sampler and attention fall back to PyTorch/FA).
#
# Usage, from the project root:
#   bash scripts/gpu_kit_vllm.sh            # here: build .kit/gpu/1..N (git-ignored), print the calls that land it
#   bash scripts/gpu_kit_vllm.sh land       # there (in the last landing call): unpack into /root/kit, /root/site
# .kit/gpu is rebuilt when what it is built from changed (.kit/gpu/PACKAGES holds a hash of the pins below, the
# pruned files, the chunk size and the shared kit's checksums); a failed download or install prints pip's output.
set -euo pipefail
root=$(git rev-parse --show-toplevel 2>/dev/null || pwd); cd "$root"
CHUNK_MB=58   # + the ~3 MB working tree < 64 MiB (67.1 MB) a call
VLLM=vllm==0.24.0
DEPS="cbor2==6.3.0 msgspec==0.23.0 pyzmq==27.3.0 pybase64==1.5.1 cachetools==8.0.2 openai==2.54.0 distro==1.9.0
jiter==0.19.0 sniffio==1.3.1 openai-harmony==0.0.8 llguidance==1.7.6 xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2
fastapi==0.136.3 starlette==1.10.0 partial-json-parser==0.2.1.1.post7 setproctitle==1.3.8 blake3==1.0.11
depyf==0.20.0 astor==0.8.1"
PRUNE="vllm_flash_attn/_vllm_fa2_C.abi3.so _moe_C_stable_libtorch.abi3.so vllm-rs third_party/fmha_sm100
third_party/deep_gemm/_C.cpython-31[0134]-*.so"

if [ "${1:-}" = "land" ]; then
  H=${KIT_HOME:-/root}   # /root on the GPU machine (the shared kit's env.sh names /root/site); tests: elsewhere
  K=$H/kitv
  cd "$K" && cat part_* > all.tar && sha256sum -c SHA256 && tar -xf all.tar && rm -f all.tar part_*
  # the shared kit exactly as its own landing call does it
  mkdir -p "$H/kit" && cat base/part_0* > "$H/kit/all.tar" && cp base/SHA256 "$H/kit/"
  (cd "$H/kit" && sha256sum -c SHA256 && tar -xf all.tar --strip-components=1 && rm all.tar &&
   python3 -m pip install -q --no-index --no-deps --no-compile --target "$H/site" whl/*.whl)
  xz -dc vllm.tar.xz | tar -x -C "$H/site"
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$H/site" --upgrade vdeps/*.whl
  rm -rf base vllm.tar.xz vdeps
  cat >> "$H/kit/env.sh" <<'SH'
# vLLM: no network, no usage reports, offline hub; its engine process finds the kit through PYTHONPATH
export VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
SH
  [ "$H" = /root ] || exit 0   # a test landing stops here: env.sh names /root/site
  . /root/kit/env.sh
  python3 -c "import dagster, boto3, gguf, vllm, torch; print('kit+vllm ok', dagster.__version__, vllm.__version__, torch.__version__, torch.cuda.get_device_name())"
  exit 0
fi

# word-split on purpose (a reflowed list is the same list), globs left unexpanded
stamp() ( set -f; { printf '%s\n' $VLLM $DEPS $PRUNE "chunk=$CHUNK_MB"; cat .kit/SHA256; } | sha256sum | cut -d' ' -f1 )

# pip's own output only when it fails (quiet otherwise): a bare "could not download" hid why (no network, a pin
# without a wheel for this platform, a full disk)
quietly() {
  local what=$1 log; shift
  log=$(mktemp)
  "$@" >"$log" 2>&1 || { echo "gpu_kit_vllm: $what failed; pip said:" >&2; cat "$log" >&2; rm -f "$log"; return 1; }
  rm -f "$log"
}

# git's own path of the exclude file: in a worktree .git is a file, not a directory
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qxF "/.kit/" "$exclude" 2>/dev/null || printf "\n/.kit/\n" >> "$exclude"
[ -f .kit/SHA256 ] || bash ../shared/tools/gpu-kit >/dev/null
want=$(stamp)
if [ "$(cat .kit/gpu/PACKAGES 2>/dev/null)" != "$want" ]; then
  # an older script's .kit/gpu has no PACKAGES: other pins, rebuilt as well
  [ -d .kit/gpu ] && echo "gpu_kit_vllm: .kit/gpu was built from another package list or shared kit: rebuilding" >&2
  stage=$(mktemp -d); trap 'rm -rf "$stage" .kit/gpu.new' EXIT
  mkdir -p "$stage/base" "$stage/vdeps" "$stage/dl" "$stage/site"
  cp .kit/1/part_* .kit/2/part_* .kit/3/part_* .kit/SHA256 "$stage/base/"
  plat="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64"
  plat="$plat --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_24_x86_64"
  plat="$plat --platform manylinux_2_31_x86_64 --platform any"
  for p in $VLLM $DEPS; do
    dest="$stage/vdeps"; [ "$p" = "$VLLM" ] && dest="$stage/dl"
    quietly "downloading $p" python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp $plat -d "$dest" "$p"
  done
  quietly "unpacking $VLLM" python3 -m pip install -q --no-deps --no-compile --target "$stage/site" \
    "$stage"/dl/vllm-*.whl
  (cd "$stage/site/vllm" && rm -rf $PRUNE)
  (cd "$stage/site" && tar -cf - vllm vllm-*.dist-info | xz -T0 -6 > "$stage/vllm.tar.xz")
  rm -rf "$stage/site" "$stage/dl"
  # built beside the old one and swapped in whole, its stamp last: an interrupted build is never taken as current
  rm -rf .kit/gpu.new; mkdir -p .kit/gpu.new
  (cd "$stage" && tar -cf - base vdeps vllm.tar.xz) > .kit/gpu.new/all.tar
  rm -rf "$stage"
  (cd .kit/gpu.new && sha256sum all.tar > SHA256 && split -b ${CHUNK_MB}M -d all.tar part_ && rm all.tar)
  i=0; for f in .kit/gpu.new/part_*; do i=$((i+1)); mkdir -p ".kit/gpu.new/$i"; mv "$f" ".kit/gpu.new/$i/"; done
  cp .kit/gpu.new/SHA256 ".kit/gpu.new/$i/"
  echo "$want" > .kit/gpu.new/PACKAGES
  rm -rf .kit/gpu && mv .kit/gpu.new .kit/gpu
fi
n=$(ls -d .kit/gpu/[0-9]* | wc -l)
du -sh .kit/gpu/[0-9]*
echo
echo "Land it with $n device calls, back to back (each within ~30 s of the last):"
for i in $(seq 1 "$n"); do
  if [ "$i" -lt "$n" ]; then
    echo "  $i. carry [\".kit/gpu/$i\"], command: mkdir -p /root/kitv && cp .kit/gpu/$i/part_* /root/kitv/ && echo kit-$i-ok"
  else
    echo "  $i. carry [\".kit/gpu/$i\"], command: cp .kit/gpu/$i/part_* .kit/gpu/$i/SHA256 /root/kitv/ && bash scripts/gpu_kit_vllm.sh land && <your work>"
  fi
done
echo "Every later call begins with:  . /root/kit/env.sh && <your work>"
