#!/usr/bin/env bash
# The main job, end to end on a fresh machine: install, prepare Multi30k, train,
# translate a few sentences, print test2016 BLEU and chrF with their signatures.
#
#   bash scripts/multi30k.sh            # quick schedule: 4 epochs (En→De; 3 De→En), minutes on a 2-core CPU
#   bash scripts/multi30k.sh --full     # the full recipe (up to 2 hours on a 2-core CPU; one model on one core)
#   bash scripts/multi30k.sh --full de_en
#   bash scripts/multi30k.sh --full --members 3 de_en   # an ensemble of 3 (default 2, 1 on one core) sharing the cores
#   bash scripts/multi30k.sh --full --seed 3 de_en      # members seeded 3, 4 (default 1, 2) in runs/..._seed3
#   bash scripts/multi30k.sh --full --size small        # the 5.3 M-parameter model (default --size auto: 15.1 M with
#                                                       # bfloat16, else 5.3 M; De->En 9.6 M with AVX-512)
#
# Data: a local copy at $MULTI30K_DIR (default ../shared/data/multi30k) is used when it
# exists; otherwise the public original is downloaded. Extra arguments after the
# direction are Hydra overrides for seq2seq-train (name=NAME: the run goes to runs/NAME).
set -euo pipefail
if [[ -n "${MULTI30K_DIR:-}" ]]; then  # a path of the caller's, before the cd below
    [[ -d "$MULTI30K_DIR" ]] || { echo "MULTI30K_DIR=$MULTI30K_DIR is not a directory" >&2; exit 2; }
    MULTI30K_DIR=$(cd "$MULTI30K_DIR" && pwd)
fi
cd "$(dirname "$0")/.."
schedule=quick
members=2
members_given=0
first_seed=1
seed_given=0
size=auto
while [[ "${1:-}" == --* ]]; do
    case "$1" in
        --full) schedule=full; shift;;
        --members) members="${2:-}"; members_given=1; shift 2 || { echo "--members needs a number" >&2; exit 2; };;
        --seed) first_seed="${2:-}"; seed_given=1; shift 2 || { echo "--seed needs a number" >&2; exit 2; };;
        --size) size="${2:-}"; shift 2 || { echo "--size needs auto, small, medium or large" >&2; exit 2; };;
        *) echo "unknown option '$1': use --full, --members N, --seed N, --size auto|small|medium|large" >&2; exit 2;;
    esac
done
if ! [[ "$members" =~ ^[1-9][0-9]*$ ]]; then echo "--members must be a whole number >= 1, got '$members'" >&2; exit 2; fi
if ! [[ "$first_seed" =~ ^(0|[1-9][0-9]*)$ ]]; then echo "--seed must be a whole number >= 0, got '$first_seed'" >&2; exit 2; fi
case "$size" in auto|small|medium|large) ;; *) echo "--size must be auto, small, medium or large, got '$size'" >&2; exit 2;; esac
# one core: one model trained the whole time beats two sharing it (docs/RESULTS.md, the one-core run)
if (( ! members_given )) && (( $(nproc) < 2 )); then members=1; fi
if [[ "$schedule" == quick && "$members_given" == 1 ]]; then echo "--members applies to --full only" >&2; exit 2; fi
if [[ "$schedule" == quick && "$size" != auto ]]; then echo "--size applies to --full only" >&2; exit 2; fi
if [[ "$schedule" == quick && "$seed_given" == 1 ]]; then echo "--seed applies to --full only (the quick schedule takes seed=N)" >&2; exit 2; fi
direction="${1:-en_de}"; shift || true
case "$direction" in en_de|de_en) ;; *) echo "direction must be en_de or de_en, got '$direction'" >&2; exit 2;; esac
if [[ "$size" == medium && "$direction" != de_en ]]; then echo "--size medium is a De->En recipe: use small or large for en_de" >&2; exit 2; fi
run_dir_given=""
name_given=""
trainer_precision=auto
trainer_accelerator=auto
member_overrides=()  # under --full, each member trains in a directory of its own inside the run directory
for arg in "$@"; do  # the Hydra overrides: a run directory of the user's wins, here too
    if [[ "$arg" == --* ]]; then
        echo "'$arg' after the direction: options go first (bash scripts/multi30k.sh --full ... ${direction})" >&2; exit 2
    fi
    key=""; if [[ "$arg" =~ ^\+{0,2}([^=]+)= ]]; then key="${BASH_REMATCH[1]}"; fi   # also +key=, ++key=
    value="${arg#*=}"
    if [[ "$key" == hydra.run.dir ]]; then run_dir_given="$value"; continue; fi
    member_overrides+=("$arg")
    case "$key" in
        name) name_given="$value";;   # runs/NAME, as seq2seq-train does
        seed) if [[ "$schedule" == full ]]; then  # it would train the same model twice
                  echo "'$arg' would give every member the same seed: use --seed N (members get N, N+1, ...)" >&2; exit 2
              fi;;
        trainer.precision) trainer_precision="$value";;
        trainer.accelerator) trainer_accelerator="$value";;
    esac
done
src="${direction%_*}"; tgt="${direction#*_}"

bash scripts/setup.sh
. .venv/bin/activate

local_copy="${MULTI30K_DIR:-../shared/data/multi30k}"
if [[ ! -f data/multi30k/prepare.json ]]; then
    if [[ -d "$local_copy" ]]; then
        seq2seq-prepare multi30k --from "$local_copy" --out data/multi30k
    else
        seq2seq-prepare multi30k --download --out data/multi30k
    fi
fi

experiment="multi30k_${direction}"
if [[ "$schedule" == quick ]]; then
    experiment="${experiment}_quick"
    echo ">>> QUICK schedule: a few epochs (minutes on a 2-core CPU; BLEU below the full recipe)." >&2
    echo ">>> The full recipe: bash scripts/multi30k.sh --full ${direction}" >&2
else
    # on a CPU without bfloat16 instructions training runs in float32, and one core fits 5 epochs
    # of the 15.1 M model in the recipe's time against about 25 of the 5.3 M one (docs/RESULTS.md)
    if [[ "$size" == auto ]]; then
        size=$(python -c 'import sys; from omegaconf import OmegaConf; from seq2seq.train import full_recipe_size
print(full_recipe_size(sys.argv[1], OmegaConf.create({"accelerator": sys.argv[2], "precision": sys.argv[3]})))' \
            "$direction" "$trainer_accelerator" "$trainer_precision")
        if [[ "$size" != large ]]; then
            echo ">>> This CPU has no bfloat16 instructions: the full recipe's ${size} model in float32 (--size large: 15.1 M)." >&2
        fi
    fi
    if [[ "$size" != large ]]; then experiment="${experiment}_${size}"; fi
fi
run_dir="runs/${experiment}"
# other seeds train in a directory of their own: the default one would resume seed 1's members
if (( first_seed != 1 )); then run_dir="${run_dir}_seed${first_seed}"; fi
if [[ -n "$name_given" ]]; then run_dir="runs/${name_given}"; fi
run_dir="${run_dir_given:-$run_dir}"
if [[ "$schedule" == quick ]]; then
    seq2seq-train "experiment=${experiment}" "hydra.run.dir=${run_dir}" "$@"
else
    # The full recipe is an ensemble: models seeded first_seed, first_seed+1, ... (one tokenizer)
    # trained side by side, sharing the cores for the recipe's time, packed into one model.pt
    # whose length penalty is chosen on the validation set.
    mkdir -p "$run_dir"
    threads=$(( $(nproc) / members )); (( threads >= 1 )) || threads=1
    pids=()
    # background members ignore Ctrl-C: stop them with the script, or they would train on (and a
    # rerun would resume the same directories beside them)
    stop_members() { kill ${pids[@]+"${pids[@]}"} 2>/dev/null || true; }
    trap 'stop_members; exit 130' INT
    trap 'stop_members; exit 143' TERM
    checkpoints=()
    for member in $(seq 1 "$members"); do
        seed=$(( first_seed + member - 1 ))
        checkpoints+=(-c "${run_dir}/member${member}/model.pt")
        echo ">>> training member ${member} of ${members} (seed ${seed}) on ${threads} thread(s): ${run_dir}/member${member}/train.log" >&2
        OMP_NUM_THREADS=$threads seq2seq-train "experiment=${experiment}" "hydra.run.dir=${run_dir}/member${member}" \
            "seed=${seed}" tokenizer.seed=1 data.test=null 'evaluate.alphas=[0.0]' ${member_overrides[@]+"${member_overrides[@]}"} \
            > "${run_dir}/member${member}.out" 2>&1 &
        pids+=("$!")
    done
    failed=0
    for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
    trap - INT TERM
    if (( failed )); then echo "training failed: see ${run_dir}/member*.out" >&2; exit 1; fi
    if (( members == 1 )); then  # copied, then renamed: never a half-written model.pt
        cp "${run_dir}/member1/model.pt" "${run_dir}/model.pt.partial"
        mv "${run_dir}/model.pt.partial" "${run_dir}/model.pt"
    else
        seq2seq-ensemble "${checkpoints[@]}" -o "${run_dir}/model.pt"
    fi
    seq2seq-tune -c "${run_dir}/model.pt" -s "data/multi30k/valid.${src}" -r "data/multi30k/valid.${tgt}" --beam-size 5
fi

echo ">>> A few test sentences (${src} -> ${tgt}), beam 5:" >&2
head -n 3 "data/multi30k/test2016.${src}" | seq2seq-translate --checkpoint "${run_dir}/model.pt" --beam-size 5 --quiet
echo ">>> test2016 ${src} -> ${tgt}, beam 5, scored by sacreBLEU:" >&2
seq2seq-evaluate --checkpoint "${run_dir}/model.pt" --source "data/multi30k/test2016.${src}" \
    --reference "data/multi30k/test2016.${tgt}" --beam-size 5 --quiet
