#!/usr/bin/env bash
# Fetch, on this machine, the wheels that benchmarks/gpu_check.sh carries to the CUDA machine: the GPU image has
# torch, numpy, scipy, h5py, pyarrow, safetensors, rich, matplotlib and huggingface_hub, but not these
# (nibabel: usam predict checks NIfTI headers with it).
# The folder .whl/ is ignored by git (.git/info/exclude) and travels with `carry: [".whl"]`.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
  "SimpleITK==$(python3 -c 'import SimpleITK; print(SimpleITK.__version__)' 2>/dev/null || echo 2.5.2)" \
  zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.8.0 \
  datasets==5.2.0 dill multiprocess segment-anything==1.0 pydicom==3.0.2 nibabel==5.4.2
# SimpleITK's wheel (50 MiB, one 260 MiB library) travels as an xz tarball of its installed files (27 MiB):
# the call's 64 MiB limit counts the working tree and the wheels together.
root=$PWD staging=$(mktemp -d)
unzip -q .whl/simpleitk-*.whl -d "$staging"
(cd "$staging" && tar cf - . | xz -9 -T0 > "$root/.whl/simpleitk.tar.xz")
rm -rf "$staging" .whl/simpleitk-*.whl
du -sh .whl; ls .whl
