#!/usr/bin/env bash
# The GPU checks of issue 20, in one run on a lent GPU machine (the device tool), under ~8 minutes:
#   `dvd doctor --json --ucx` at the issue's GPU sizes (flex attention), its decode/prefill figures again with
#   the torch backend (the padded gather) to compare, and the tests that need CUDA. Outputs under $OUT:
#   env.txt, doctor.json, doctor_torch.json, tests.log, and doctor.log (the doctors' stderr).
#
# That machine's image has python3 with torch (cu13), transformers, numpy, safetensors, tokenizers, pillow,
# msgpack, grpcio, pyyaml, psutil and pytest (/work/.library/device/KINDS.md), but older transformers than
# pyproject asks for and no ucxx: carry transformers as a wheel (pure Python), once, in the repo's root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl "transformers==$(python3 -c \
#       'import transformers; print(transformers.__version__)')"
# then: run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=560). Without ucxx the UCX
# loopback says it was skipped. Nothing is installed into the image: `dvd` is made importable from the tree.
set -u
OUT=${OUT:-/tmp/dvd-gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
cd "$(dirname "$0")/.."

if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
# The installed layout (pyproject's package-dir): dvd.language_server is language_server/, and so on.
for package in transport vision_server language_server pipeline deploy benchmarks; do
    ln -sfn "../$package" "dvd/$package"
done
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda);
import transformers; print("transformers", transformers.__version__)' 2>&1
} > "$OUT/env.txt" 2>&1

status=0
timeout 270 python3 -W ignore -m dvd doctor --json --ucx > "$OUT/doctor.json" 2> "$OUT/doctor.log" || status=1
timeout 120 python3 -W ignore -m dvd doctor --json --attention-backend torch \
    --skip versions,attention_kernels,paged_attention_bf16,engine_vs_generate,vision,ucx_loopback \
    > "$OUT/doctor_torch.json" 2>> "$OUT/doctor.log" || status=1
timeout 150 python3 -m pytest -q -p no:cacheprovider -o addopts="" \
    tests/language_server/test_cuda.py tests/transport/test_pool_memory.py tests/language_server/test_sampler.py \
    tests/language_server/test_decode_attention.py > "$OUT/tests.log" 2>&1 || status=1

for package in transport vision_server language_server pipeline deploy benchmarks; do rm -f "dvd/$package"; done
tail -n 5 "$OUT/tests.log"
python3 - "$OUT" <<'EOF' || true
import json, pathlib, sys
for name in ("doctor.json", "doctor_torch.json"):
    text = (pathlib.Path(sys.argv[1]) / name).read_text().strip().splitlines()
    if not text:
        print(name, "empty (see doctor.log)")
        continue
    report = json.loads(text[-1])
    print(name, "ok" if report["ok"] else "FAILED")
    for check in report["checks"]:
        print(f"  [{'ok' if check['ok'] else 'FAIL'}] {check['name']}: {check['summary'][:300]}")
EOF
exit $status
