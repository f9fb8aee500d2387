//! `desam-train`: precompute embeddings, train the decoder, evaluate across sites, export models.

fn main() {
    eprintln!("desam-train: error: not implemented yet (see the training issue)");
    std::process::exit(1);
}
