# Helpers the user-facing scripts source (it runs nothing by itself).

# paths_from_caller NAME...: each named variable that holds a relative path becomes absolute, read from the folder
# the script was called from. Call it before the script changes folder.
paths_from_caller() {
    local name value
    for name in "$@"; do
        value=${!name:-}
        if [ -n "$value" ] && [ "${value#/}" = "$value" ]; then
            printf -v "$name" '%s' "$PWD/$value"
        fi
    done
}

# ensure_tiny_world: generate the default tiny world (TRAIN_IMAGES / TEST_IMAGES images) when it is missing, so the
# scripts run with no arguments on a fresh clone. Run it from the repository's root.
TINY_WORLD=./playground/data/tiny_world
ensure_tiny_world() {
    if [ ! -f "$TINY_WORLD/train_single_turn.json" ] || [ ! -d "$TINY_WORLD/eval" ]; then
        echo "the tiny world is missing: generating it in $TINY_WORLD (python -m llava.world.generate, seconds)"
        "$PYTHON" -m llava.world.generate --out "$TINY_WORLD" --train "${TRAIN_IMAGES:-20000}" --test "${TEST_IMAGES:-2000}"
    fi
}
