//! Prints the sparse MLP component benchmarks as JSON (ignored by default: a benchmark,
//! not a test; run with `cargo test --release --test sparse_components -- --ignored
//! --nocapture`). `sparsellm bench --components` calls the same function.

#[test]
#[ignore]
fn component_benchmarks() {
    let pool = sparsellm::kernels::pool::global();
    let report = sparsellm::sparse::bench::components(pool, 15);
    println!("{}", serde_json::to_string_pretty(&report).unwrap());
}
