//! Draws a sweep's plot again from its `sweep.json` (e.g. after a change to the plot),
//! without evaluating anything: `cargo run --release --example replot_sweep -- DIR`
//! reads DIR/sweep.json and writes DIR/sweep.png.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args()
        .nth(1)
        .ok_or("usage: replot_sweep DIR (the --out DIR of `sparsellm eval --sweep`)")?;
    let dir = std::path::Path::new(&dir);
    let json = std::fs::read_to_string(dir.join("sweep.json"))?;
    let report: sparsellm::sweep::SweepReport = serde_json::from_str(&json)?;
    sparsellm::sweep::plot(&report, &dir.join("sweep.png"))?;
    println!("{}", dir.join("sweep.png").display());
    Ok(())
}
