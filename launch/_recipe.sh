# Sourced by the launch scripts: the recipe is the first argument (or $CONFIG), the rest are overrides.
# Sets RECIPE and the array OVERRIDES; a missing recipe is a one-line error.
if [[ $# -gt 0 && "$1" != --* ]]; then
    RECIPE=$1
    shift
else
    RECIPE=${CONFIG:-}
fi
if [[ -z "$RECIPE" ]]; then
    echo "error: name a recipe: bash $0 configs/runs/<recipe>.toml [--section.key=value ...]" >&2
    exit 2
fi
if [[ ! -f "$RECIPE" ]]; then
    echo "error: recipe '$RECIPE' not found; pick one of configs/runs/*.toml" >&2
    exit 2
fi
OVERRIDES=("$@")

# validate WORLD [more train.py args]: every data-free check of train.py (about a second), so a bad recipe or
# override is one line here, not a worker's line buried under the launcher's own traceback.
validate() {
    local world=$1
    shift
    WORLD_SIZE=$world python train.py --validate --config "$RECIPE" "$@" "${OVERRIDES[@]}"
}
