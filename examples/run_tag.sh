# Sourced by every example script (not run on its own): the seed and the name of a run.
#
#   SEED     the method's seed (default 0), passed as method.seed; set it here, not as an override
#   RUN_TAG  optional free label, e.g. RUN_TAG=bf16 for a variant of the same seed
#
# Sets TAG=seed<SEED>[_<RUN_TAG>], which every script puts into its report path and logger name, so
# that running a script again with another SEED or RUN_TAG writes beside the earlier run's outputs
# instead of stopping at the output guard (which never overwrites a report).
SEED="${SEED:-0}"
if ! [[ "$SEED" =~ ^[0-9]+$ ]]; then
    echo "error: SEED=$SEED: expected a non-negative integer (the method's seed)" >&2
    exit 2
fi
if [[ -n "${RUN_TAG:-}" && ! "$RUN_TAG" =~ ^[A-Za-z0-9._-]+$ ]]; then
    echo "error: RUN_TAG=$RUN_TAG: use letters, digits, '.', '_' or '-' (it names files)" >&2
    exit 2
fi
for arg in "$@"; do
    case "$arg" in
    method.seed=* | report_save_path=*)
        echo "error: '$arg': set the seed with SEED=N and the run's name with RUN_TAG=..." \
            "(they name the report), e.g. SEED=1 bash $0" >&2
        exit 2
        ;;
    esac
done
TAG="seed${SEED}${RUN_TAG:+_${RUN_TAG}}"
