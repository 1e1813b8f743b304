# Sourced by the bench scripts, which run from the repository root.

# The binary under test: $MGRUN, else the release build ($CARGO_TARGET_DIR honoured).
MGRUN=${MGRUN:-${CARGO_TARGET_DIR:-target}/release/mgrun}

# synthetic_bench_dir DIR IMAGES_PER_CLASS: empties DIR and generates a synthetic dataset of 32-px
# images in DIR/data.
synthetic_bench_dir() {
    rm -rf "$1"; mkdir -p "$1"
    "$MGRUN" datagen synthetic --out "$1/data" --images-per-class "$2" --image-size 32 >/dev/null
}

# synthetic_data_table DIR TEST_DOMAIN BATCH_PER_DOMAIN: a job's [data] table for the dataset that
# synthetic_bench_dir DIR wrote.
synthetic_data_table() {
    cat <<TOML
[data]
dataset = "synthetic"
root = "$1/data"
test_domains = ["$2"]
batch_per_domain = $3
image_size = 32
TOML
}
