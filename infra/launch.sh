#!/usr/bin/env bash
# Launch the trainer's ranks (python -m trainer.train) on this node or a cluster; same command on CPU and GPU.
#
#   infra/launch.sh torchrun  CONFIG.yaml [trainer args...]   # one node: NPROC ranks (default: GPUs, else 1)
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=host0 infra/launch.sh torchrun CONFIG.yaml   # run once per node
#   HOSTFILE=hosts infra/launch.sh deepspeed CONFIG.yaml                          # DeepSpeed's ssh launcher
#   infra/launch.sh single CONFIG.yaml                                            # one process, no launcher
#
# train.world_size in CONFIG must equal the total number of ranks (nodes x NPROC): the trainer asserts
# train_batch = micro_batch x grad_accum x world_size at start. Checkpoints go to train.output, which
# must be a directory every node can see for multi-node runs. Trainer args: --manifest URI, --set k=v.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$REPO_ROOT/.venv/bin/python}"
MODE="${1:?usage: infra/launch.sh torchrun|deepspeed|single CONFIG.yaml [trainer args...]}"
CONFIG="${2:?usage: infra/launch.sh torchrun|deepspeed|single CONFIG.yaml [trainer args...]}"
shift 2

cd "$REPO_ROOT"
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$REPO_ROOT/.venv/torch_extensions}"

GPUS="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"
NPROC="${NPROC:-$([ "$GPUS" -gt 0 ] && echo "$GPUS" || echo 1)}"
NNODES="${NNODES:-1}"
# CPU ranks share the node's cores; one OpenMP pool per core group, not one per core per rank.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}"

case "$MODE" in
  single)
    exec "$PYTHON" -m trainer.train --config "$CONFIG" "$@" ;;
  torchrun)
    if [ "$NNODES" -eq 1 ]; then
      exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" \
        -m trainer.train --config "$CONFIG" "$@"
    fi
    exec "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --node_rank="${NODE_RANK:?set NODE_RANK}" \
      --nproc_per_node="$NPROC" --master_addr="${MASTER_ADDR:?set MASTER_ADDR}" \
      --master_port="${MASTER_PORT:-29500}" -m trainer.train --config "$CONFIG" "$@" ;;
  deepspeed)
    PORT="${MASTER_PORT:-$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("",0)); print(s.getsockname()[1])')}"
    HOSTARGS=()
    if [ -n "${HOSTFILE:-}" ]; then HOSTARGS=(--hostfile "$HOSTFILE"); else HOSTARGS=(--num_gpus "$NPROC"); fi
    [ "$GPUS" -eq 0 ] && [ -z "${HOSTFILE:-}" ] && HOSTARGS=(--num_nodes 1 --num_gpus "$NPROC")
    status=0
    "$PYTHON" -m deepspeed.launcher.runner "${HOSTARGS[@]}" --master_port "$PORT" --module trainer.train \
      --config "$CONFIG" "$@" || status=$?
    # DeepSpeed's CPU shared-memory allreduce leaves one segment per rank in /dev/shm; the ranks remove
    # their own on a clean exit, this catches the ones a crash leaves behind (this run's port only).
    rm -f /dev/shm/deepspeed_allreduce_buffer_"$(id -u)"_*_"$PORT"_* 2>/dev/null || true
    exit "$status" ;;
  *)
    echo "infra/launch.sh: unknown mode '$MODE' (torchrun, deepspeed or single)" >&2; exit 2 ;;
esac
