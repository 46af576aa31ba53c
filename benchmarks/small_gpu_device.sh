#!/usr/bin/env bash
# The `small` profile on a lent GPU machine (benchmarks/small_gpu.py; README "The small profile").
# Runs from the repository root there; .whl holds the wheels the machine lacks (`make gpu-wheels`:
# diffusers, pydantic, av, array-api-compat, deepspeed's sdist; av comes unzipped as NAME.unpacked.tar.xz).
# Background work is started with setsid, so it outlives the call that
# started it while the machine stays warm; `watch` follows it and packs what is done into $OUT.
#   bash benchmarks/small_gpu_device.sh smoke          # install, then every stage at full size, few steps
#   bash benchmarks/small_gpu_device.sh bench-vae ARGS # install, then seconds per VAE training step ($OUT/vae-train.json)
#   bash benchmarks/small_gpu_device.sh bench-prefetch ARGS  # after prepare: the training step with the batch prefetch
#                                                      # on and off ($OUT/train-prefetch.json; ARGS: --set k=v, --steps N,
#                                                      # --out $OUT/NAME.json for a second setting in the same call)
#   bash benchmarks/small_gpu_device.sh prepare ARGS   # data, encode, autoencoder, latents (background; ARGS: --set k=v,
#                                                      # e.g. --set vae.train.steps=3000; give variants the same --set;
#                                                      # a data-size run: --set data.num_clips=3000 --vae-from-fewer-clips
#                                                      # takes the carried VAE of the first 2,000 clips)
#   bash benchmarks/small_gpu_device.sh vae-compiled   # after `prepare --set acceleration.compile_vae=false` (background):
#                                                      # the autoencoder stage again, compiled, on a copy of that run's
#                                                      # data; `watch` then returns its records ($OUT/vae-compiled/)
#   bash benchmarks/small_gpu_device.sh variants ARGS  # the tab1-2 variants (background; ARGS: --per-gpu 2, --set k=v,
#                                                      # --gpus-per-variant 2: each variant data parallel on 2 GPUs).
#                                                      # One variant of small's defaults trains ~13 min on an H200 (14.4-15.7 on an H100,
#                                                      # where a third, short `watch` ends it): a 30-minute lent session holds one (--variants udpdiff-depth)
#   bash benchmarks/small_gpu_device.sh watch SECONDS  # follow the logs, then pack into $OUT (small.tar.gz, small-2.tar.gz, ...: ≤ 15 MiB each)
# `watch` returns within SECONDS + ~15 s: a call that runs past the device's per-call limit loses
# the machine and everything on it (attempt 2). It also returns a VAE trained there ($OUT/vae-small.tar);
# put that file in .gpu-carry/ (xz it; small's own is committed there as vae-small.tar.xz): `prepare` on a fresh machine restores it and skips the VAE.
set -uo pipefail
SITE=/tmp/site RUN=/tmp/small CODE=/tmp/small-code OUT=${OUT:-/tmp/out}
export PYTHONPATH=$SITE:$CODE PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
install() {
  [ -f $SITE/.done ] && return
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $SITE .whl/*.whl &&
  DS_BUILD_OPS=0 python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
    --target $SITE .whl/deepspeed-*.tar.gz || exit 1
  # wheels carried unpacked and xz'd (PyAV: 36 MB as a wheel, 25 MB so) to fit the 64 MiB carry
  for t in .whl/*.unpacked.tar.xz; do [ -e "$t" ] && { tar -xJf "$t" -C $SITE || exit 1; }; done
  mkdir -p $CODE && tar --exclude=./.whl -cf - . | tar -xf - -C $CODE  # a copy the next call's sync never touches
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, diffusers, deepspeed; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'deepspeed', deepspeed.__version__)"
  # every stage imports now, not minutes later in a background job (a missing array_api_compat
  # once cost a whole call): a module that fails names the wheel to add to .whl
  (cd $CODE && python3 -c "
import importlib
for m in ('data', 'encode', 'autoencoder', 'latents', 'train', 'sample', 'evaluate', 'report'):
    importlib.import_module('udpdiff.stages.' + m)") || { echo "install: a stage does not import: add the missing wheel to .whl"; exit 1; }
  touch $SITE/.done
}
driver() { python3 $CODE/benchmarks/small_gpu.py "$@"; }
case "$1" in
  smoke)
    install
    S="--set data.num_clips=96 --set vae.train.steps=40 --set train.steps=40 --set train.sample_every=20
       --set train.checkpoint_every=20 --set train.validation_clips=2 --set sample.num_samples=2 --set sample.gallery_size=2"
    time driver all --root /tmp/smoke --out $OUT/smoke.tar.gz --variants udpdiff-multi-task cogvideox $S
    rc=$?; tail -n 25 /tmp/smoke/logs/*.log
    python3 - <<'PY'
import json, glob, pandas as pd
for f in sorted(glob.glob("/tmp/smoke/**/gpu_run/*.done.json", recursive=True)):
    r = json.load(open(f)); print(f"{f.split('/tmp/smoke/')[1]:75s} {r['seconds']:8.1f} s")
for f in glob.glob("/tmp/smoke/variants/*/outputs/small/metrics/train_history.csv"):
    print(f); print(pd.read_csv(f).tail(3).to_string())
PY
    exit $rc ;;
  bench-vae)
    shift; install
    python3 $CODE/benchmarks/bench_vae_train.py --out $OUT/vae-train.json "$@" ;;
  bench-prefetch)  # after `prepare` (its latent cache) and with the GPU otherwise idle
    shift; install
    python3 $CODE/benchmarks/bench_train_prefetch.py --root $RUN --out $OUT/train-prefetch.json "$@" ;;
  prepare)
    shift; install; mkdir -p $RUN/logs
    carried=$(ls .gpu-carry/vae-small.tar* 2>/dev/null | head -n 1)  # .tar, or .tar.xz to fit the 64 MiB carry
    if [ -n "$carried" ] && [ ! -f $RUN/outputs/small/gpu_run/autoencoder.done.json ]; then
      driver restore-vae --root $RUN --vae "$carried" "$@" || exit 1
      touch $RUN/vae-from-carry  # `watch` then returns no copy of it
    fi
    setsid nohup python3 $CODE/benchmarks/small_gpu.py prepare --root $RUN "$@" >> $RUN/logs/prepare.log 2>&1 < /dev/null &
    echo "prepare started" ;;
  vae-compiled)  # the compiled VAE's stage time and scores beside the eager one's, same data and seed
    install; mkdir -p $RUN/logs
    # patterns end in "$RUN " so that they match the prepare processes, not this job's own command line
    setsid nohup bash -c "while [ ! -f $RUN/outputs/small/gpu_run/autoencoder.done.json ]; do
        pgrep -f '[s]mall_gpu.py prepare --root $RUN ' > /dev/null ||
          { echo 'vae-compiled: prepare stopped without its VAE'; exit 1; };
        sleep 5; done;
      pkill -f '[s]mall_gpu.py prepare --root $RUN '; sleep 5;
      rm -rf $RUN-compiled && cp -a $RUN $RUN-compiled &&
      rm -rf $RUN-compiled/models/small/vae $RUN-compiled/outputs/small/gpu_run/autoencoder* \
        $RUN-compiled/outputs/small/metrics/autoencoder.json $RUN-compiled/outputs/small/gpu_run/latents* || exit 1;
      setsid python3 $CODE/benchmarks/small_gpu.py prepare --root $RUN-compiled --set acceleration.compile_vae=true &
      pid=\$!;
      while [ ! -f $RUN-compiled/outputs/small/gpu_run/autoencoder.done.json ]; do sleep 5;
        kill -0 \$pid 2> /dev/null || { echo 'vae-compiled: the compiled run stopped without its VAE'; exit 1; }; done;
      kill -- -\$pid; echo 'vae-compiled: done'" \
      >> $RUN/logs/vae-compiled.log 2>&1 < /dev/null &
    echo "vae-compiled queued" ;;
  variants)
    shift; install; mkdir -p $RUN/logs
    # waits for prepare's latents, or gives up when prepare is gone without them (a failed prepare
    # would otherwise keep `watch` waiting for the whole call)
    setsid nohup bash -c "while [ ! -f $RUN/outputs/small/gpu_run/latents.done.json ]; do
        pgrep -f '[s]mall_gpu.py prepare' > /dev/null ||
          { sleep 5; [ -f $RUN/outputs/small/gpu_run/latents.done.json ] && break;
            echo 'variants: prepare stopped without the latents (see prepare.log)'; exit 1; };
        sleep 5; done;
      python3 $CODE/benchmarks/small_gpu.py variants --root $RUN $*;
      for d in $RUN/variants/*/outputs/small/samples/segmentation; do  # decode tolerance on predictions
        [ -d \$d ] && python3 $CODE/benchmarks/small_vae_ceiling.py --predictions \$d --out \$d/../../metrics/tolerance_sweep.json;
      done;
      for f in $RUN/variants/*/outputs/small/metrics/dense_predictions.npz; do  # where depth goes wrong, per clip
        [ -f \$f ] && python3 $CODE/benchmarks/small_depth_errors.py \$f --out \$(dirname \$f)/depth_errors.json;
      done" \
      >> $RUN/logs/variants.log 2>&1 < /dev/null &
    echo "variants queued: $*" ;;
  watch)
    end=$((SECONDS + $2))
    while [ $SECONDS -lt $end ]; do
      left=$((end - SECONDS)); sleep $((left < 60 ? left : 60))
      echo "== $(date +%T)"; grep -ah "done in\|rror\|finished\|stopped\|step [0-9]*0: \|val/" $RUN/logs/*.log 2>/dev/null | tail -n 4 | cut -c1-300
      pgrep -f "[s]mall_gpu.py" > /dev/null || { echo "nothing running"; break; }
    done
    nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader
    r=$RUN-compiled/outputs/small  # vae-compiled's autoencoder stage records (the eager run's are in the pack)
    [ -f $r/gpu_run/autoencoder.done.json ] && mkdir -p $OUT/vae-compiled &&
      cp $r/gpu_run/autoencoder* $r/metrics/autoencoder.json $OUT/vae-compiled/
    driver pack --root $RUN --out $OUT/small.tar.gz
    # a VAE restored from the carry is the file carried: returning it again (14 MB) only delays the
    # reply, and a reply later than the 30 s idle release loses the machine (attempt 18)
    [ -f $RUN/vae-from-carry ] || driver save-vae --root $RUN --out $OUT/vae-small.tar ;;
esac
