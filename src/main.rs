//! Thin shell: everything lives in the library (see `cli::main`).

fn main() {
    std::process::exit(duvo_bridge::cli::main());
}
