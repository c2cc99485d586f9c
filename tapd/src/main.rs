fn main() {
    eprintln!("tapd: not built yet");
    std::process::exit(70);
}
