#!/bin/bash
# Training of experiments.train on a Cloud TPU VM (one host or a pod slice), from your machine.
#
#   TPU_NAME=my-tpu ZONE=us-central2-b experiments/launch/tpu_vm_train.sh setup   # once
#   TPU_NAME=my-tpu ZONE=us-central2-b experiments/launch/tpu_vm_train.sh train --config.model.depth=56
#   DRY_RUN=1 experiments/launch/tpu_vm_train.sh train                  # print, run nothing
#
# On a TPU pod slice every worker (host) runs the same command (`--worker=all`), one process
# per host driving its local TPU chips; with --distributed, jax.distributed.initialize()
# auto-detects the slice (coordinator, process count and id from the TPU metadata). Every
# process reads its own shard of the data: batch_size and eval_batch_size must be multiples of
# the number of hosts.
#
# `setup` installs resflax with the TPU build of jax on every worker (`pip install -e .
# 'jax[tpu]'` in REPO_DIR, cloning REPO_URL there first when set and REPO_DIR is missing).
# `train` (the default) starts the run on every worker.
#
# Environment (defaults in brackets); arguments after `train` are appended as flags:
#   TPU_NAME, ZONE  the TPU VM and its zone [required unless DRY_RUN=1]
#   PROJECT         GCP project [gcloud's default]
#   REPO_DIR        the resflax checkout on each worker, relative to the home directory [resflax]
#   REPO_URL        git URL to clone into REPO_DIR in `setup` [none: the code is already there]
#   CONFIG          config file [configs/cifar10_he2015.py]
#   WORKDIR         a path mounted on every worker (Filestore / NFS, or a bucket via gcsfuse):
#                   processes write checkpoints into it, and experiments.train writes with
#                   os / open, so gs:// URLs are not accepted [/mnt/shared/resflax_runs/<config>]
#   DATA_DIR        tfds data_dir with the prepared array_record data, on every worker
#                   [/mnt/shared/tensorflow_datasets]
#   EXTRA_FLAGS     more flags, split on whitespace [none]
#   PYTHON          interpreter on the workers [python3]
#   DRY_RUN=1       print the gcloud commands instead of running them

set -euo pipefail

DRY_RUN=${DRY_RUN:-0}
TPU_NAME=${TPU_NAME:-}
ZONE=${ZONE:-}
PROJECT=${PROJECT:-}
REPO_DIR=${REPO_DIR:-resflax}
REPO_URL=${REPO_URL:-}
CONFIG=${CONFIG:-configs/cifar10_he2015.py}
config_name=$(basename "${CONFIG%%:*}" .py)
WORKDIR=${WORKDIR:-/mnt/shared/resflax_runs/$config_name}
DATA_DIR=${DATA_DIR:-/mnt/shared/tensorflow_datasets}
EXTRA_FLAGS=${EXTRA_FLAGS:-}
PYTHON=${PYTHON:-python3}

# A word as the shell reads it back: unquoted when safe, else single-quoted.
quote() {
  local word=$1 prefix=""
  if [[ $word =~ ^(--[A-Za-z0-9_.-]+=)(.*)$ ]]; then  # --flag='value': quote the value only
    prefix=${BASH_REMATCH[1]} word=${BASH_REMATCH[2]}
  fi
  if [[ $word =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s%s' "$prefix" "$word"
  else
    printf "%s'%s'" "$prefix" "${word//\'/\'\\\'\'}"
  fi
}

# All arguments quoted and joined by spaces: one command line.
join_quoted() {
  local words=() word
  for word in "$@"; do words+=("$(quote "$word")"); done
  printf '%s' "${words[*]}"
}

# Prints the command (DRY_RUN=1) or runs it.
run() {
  if [[ $DRY_RUN == 1 ]]; then
    printf '%s\n' "$(join_quoted "$@")"
  else
    "$@"
  fi
}

# Runs the shell command line $1 on every worker of the TPU VM.
on_all_workers() {
  if [[ $DRY_RUN != 1 && ( -z $TPU_NAME || -z $ZONE ) ]]; then
    echo "tpu_vm_train.sh: set TPU_NAME and ZONE (or DRY_RUN=1)" >&2
    exit 2
  fi
  local gcloud=(gcloud compute tpus tpu-vm ssh "${TPU_NAME:-TPU_NAME}" "--zone=${ZONE:-ZONE}")
  if [[ -n $PROJECT ]]; then gcloud+=("--project=$PROJECT"); fi
  run "${gcloud[@]}" --worker=all "--command=$1"
}

setup() {
  local install
  install="cd $(quote "$REPO_DIR") && $(join_quoted "$PYTHON" -m pip install -e . 'jax[tpu]')"
  if [[ -n $REPO_URL ]]; then
    install="{ test -d $(quote "$REPO_DIR") || git clone $(quote "$REPO_URL") $(quote "$REPO_DIR"); } && $install"
  fi
  on_all_workers "$install"
}

train() {
  if [[ $WORKDIR == *://* ]]; then
    echo "tpu_vm_train.sh: WORKDIR=$WORKDIR: use a path mounted on every worker (e.g. a" \
         "gcsfuse mount of the bucket); experiments.train does not write to URLs" >&2
    exit 2
  fi
  local extra=()
  read -r -a extra <<< "$EXTRA_FLAGS"
  local cmd=("$PYTHON" -m experiments.train "--config=$CONFIG" "--workdir=$WORKDIR" --distributed
             "--config.data.data_dir=$DATA_DIR" ${extra[@]+"${extra[@]}"} "$@")
  on_all_workers "cd $(quote "$REPO_DIR") && $(join_quoted "${cmd[@]}")"
}

action=${1:-train}
case $action in
  setup) shift; setup "$@" ;;
  train) shift || true; train "$@" ;;
  *) echo "usage: $0 [setup | train [FLAG ...]]" >&2; exit 2 ;;
esac
