#!/usr/bin/env bash
# Distillation throughput with 1 and 2 processes (torchrun, gloo, 1 thread each) on CPU, and the teacher
# cache's announced size against its size on disk. Writes OUT/record.json + prints a table.
#
#   benchmarks/distill/ddp_cpu.sh [OUT]      # default OUT: benchmarks/results/distill-ddp-cpu
#
# Synthetic layers (96 B-scans at 256 px), a random mirage-tiny teacher with a segmentation head,
# mobilenetv4_conv_small, stages 1 and 2 (2 epochs each, global batch 16), no QAT. A fresh cache per run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
OUT="${1:-benchmarks/results/distill-ddp-cpu}"
WORK="$(mktemp -d -t mirage-ddp.XXXXXX)"
mkdir -p "$OUT"
"$PY" - "$WORK" <<'PY'
import sys, torch
from mirage_edge.data.synth import synthesize
from mirage_edge.models import create_model, save_model
from mirage_edge.models.task import segmentation_model
w = sys.argv[1]
synthesize(f"{w}/layers", "layers", 96, seed=0, size=256)
torch.manual_seed(0)
enc = create_model("mirage-tiny", input_size=256, in_domains=["bscan"], out_domains=[])
save_model(segmentation_model(enc, 9, class_dim=32, depth=2), f"{w}/teacher")
PY
for N in 1 2; do
  OMP_NUM_THREADS=1 MIRAGE_EDGE_HOME="$WORK/home$N" "$PY" -m torch.distributed.run --nproc-per-node "$N" \
    --master-port $((29600 + N)) -m mirage_edge.cli distill --recipe layers-tiny --teacher "$WORK/teacher" \
    --data "$WORK/layers" --image-size 256 --student mobilenetv4_conv_small --no-qat --out "$WORK/run$N" \
    cache.dir="\"$WORK/cache$N\"" stage1.epochs=2 stage2.epochs=2 stage1.batch_size=16 stage2.batch_size=16 \
    run.threads=1 run.progress=false run.eval_every=0 > "$WORK/run$N.log" 2>&1
done
"$PY" - "$WORK" "$OUT" <<'PY'
import json, os, platform, statistics, sys, re
w, out = sys.argv[1], sys.argv[2]
rec = {"command": "benchmarks/distill/ddp_cpu.sh", "cpu": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
       if l.startswith("model name")), platform.processor()), "cores": os.cpu_count(), "runs": {}}
for n in (1, 2):
    r = {}
    for st in ("stage1", "stage2"):
        tr = [json.loads(l) for l in open(f"{w}/run{n}/{st}/metrics.jsonl")]
        tr = [x for x in tr if x["event"] == "train"]
        r[f"{st}_img_per_s"] = statistics.median(x["samples_per_s"] for x in tr[1:] or tr)
    log = open(f"{w}/run{n}.log").read()
    # one announcement per cache: stage 1 (tokens) and stage 2 (logits)
    found = re.findall(r"teacher cache: (\d+) rows .*?, ([0-9.e+-]+) GB on disk", log)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(f"{w}/cache{n}") for f in fs)
    rep = json.load(open(f"{w}/run{n}/report.json"))
    r.update(cache_rows=[int(n) for n, _ in found], cache_announced_gb=sum(float(g) for _, g in found),
             cache_on_disk_gb=size / 1e9,
             test_dice=rep["test"]["student_value"], seconds=rep["seconds"])
    rec["runs"][n] = r
rec["speedup_stage1"] = rec["runs"][2]["stage1_img_per_s"] / rec["runs"][1]["stage1_img_per_s"]
rec["speedup_stage2"] = rec["runs"][2]["stage2_img_per_s"] / rec["runs"][1]["stage2_img_per_s"]
json.dump(rec, open(f"{out}/record.json", "w"), indent=1)
print(json.dumps(rec, indent=1))
PY
