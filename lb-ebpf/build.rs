//! Code generation options for the BPF object. rustc only emits LLVM bitcode for this
//! target; bpf-linker generates the code, so these are linker arguments.
fn main() {
    if std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("bpf") {
        // - allows-misaligned-mem-access: header fields sit at any byte offset; without
        //   it every multi-byte packet read becomes byte loads and shifts. The kernel
        //   allows misaligned packet and map-value access on the architectures we run on
        //   (x86-64, arm64) and checks stack alignment itself, so stack objects must not
        //   be read wider than they are aligned (see encap::store_words).
        // - alu32: 32-bit subregisters, so u32 arithmetic (the token's SHA-256) needs no
        //   zero-extension pairs. rustc already passes `--cpu generic`; a second `--cpu`
        //   is refused, so the feature is named here instead.
        println!("cargo:rustc-link-arg=--cpu-features=+allows-misaligned-mem-access,+alu32");
    }
}
