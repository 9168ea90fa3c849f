# Sourced by the gpu_*.sh scripts beside it, on a borrowed GPU machine whose python3 has torch (and
# numpy, safetensors, matplotlib, fontTools) but not this project installed: puts the package source
# folders on the path as the free_dfml namespace package (what `pip install .` maps them to), sets
# $repo, $py (PYTHON, default python3) and $dev (DEVICE, default cuda; cpu for a dry run of the
# plumbing), moves into the repository and prints the GPU and torch versions.
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
shim=$(mktemp -d)
mkdir -p "$shim/free_dfml"
for p in common client server sim; do [ -d "$repo/$p" ] && ln -s "$repo/$p" "$shim/free_dfml/$p"; done
export PYTHONPATH="$shim:$repo" PYTHONUNBUFFERED=1 FREE_DFML_CACHE="${FREE_DFML_CACHE:-$(mktemp -d)}"
py=${PYTHON:-python3}
dev=${DEVICE:-cuda}
cd "$repo" || exit 1
if [ "$dev" = cuda ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    $py -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))" || exit 1
fi
