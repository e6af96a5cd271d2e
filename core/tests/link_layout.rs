//! The `zring` binary is linked for a small resident footprint (core/build.rs): the functions
//! listed in core/hot-text.ld sit together in a `.text.hot` section at the front of the code,
//! and relative relocations are packed (DT_RELR). Read from the built binary's ELF headers and
//! symbol table, so a change to the build script, the linker or the script's syntax that
//! silently drops either shows up here. The RSS these save is measured by the harness
//! (`zring-bench run --scenarios idle`), not here.

use std::collections::{HashMap, HashSet};

struct Section {
    name: String,
    kind: u32,
    addr: u64,
    offset: u64,
    size: u64,
    link: u32,
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes(b[o..o + 2].try_into().unwrap())
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}
fn c_str(b: &[u8], o: usize) -> String {
    let end = b[o..].iter().position(|&c| c == 0).unwrap();
    String::from_utf8_lossy(&b[o..o + end]).into_owned()
}

/// The section headers of a little-endian ELF64 file.
fn sections(elf: &[u8]) -> Vec<Section> {
    assert_eq!(&elf[..4], b"\x7fELF", "not an ELF file");
    assert_eq!(elf[4], 2, "not ELF64");
    let (shoff, shentsize) = (u64_at(elf, 0x28) as usize, u16_at(elf, 0x3a) as usize);
    let (shnum, shstrndx) = (u16_at(elf, 0x3c) as usize, u16_at(elf, 0x3e) as usize);
    let header = |i: usize| &elf[shoff + i * shentsize..shoff + (i + 1) * shentsize];
    let names_at = u64_at(header(shstrndx), 0x18) as usize;
    (0..shnum)
        .map(|i| {
            let h = header(i);
            Section {
                name: c_str(elf, names_at + u32_at(h, 0) as usize),
                kind: u32_at(h, 4),
                addr: u64_at(h, 0x10),
                offset: u64_at(h, 0x18),
                size: u64_at(h, 0x20),
                link: u32_at(h, 0x28),
            }
        })
        .collect()
}

/// (name, address) of every function symbol in `.symtab`.
fn functions(elf: &[u8], secs: &[Section]) -> Vec<(String, u64)> {
    let symtab = secs
        .iter()
        .find(|s| s.kind == 2)
        .expect("the binary keeps its symbol table (.symtab)");
    let strtab = &secs[symtab.link as usize];
    let mut out = Vec::new();
    for i in 0..(symtab.size / 24) as usize {
        let o = symtab.offset as usize + i * 24;
        let (name, info, value) = (u32_at(elf, o), elf[o + 4], u64_at(elf, o + 8));
        if info & 0xf == 2 && value != 0 {
            out.push((c_str(elf, strtab.offset as usize + name as usize), value));
        }
    }
    out
}

#[test]
fn the_functions_the_proxy_runs_are_grouped_and_relocations_packed() {
    let elf = std::fs::read(env!("CARGO_BIN_EXE_zring")).unwrap();
    let secs = sections(&elf);
    let find = |name: &str| secs.iter().find(|s| s.name == name);

    let hot = find(".text.hot").expect("core/hot-text.ld is in force: a .text.hot section");
    let text = find(".text").expect(".text");
    assert!(
        hot.size >= 1 << 20,
        ".text.hot holds only {} KiB: the script's names and patterns no longer match the \
         binary's functions (regenerate with scripts/hot-text)",
        hot.size >> 10
    );
    assert!(hot.addr < text.addr, ".text.hot is placed before .text");

    // Every function the script names exactly, where the binary has it, is in .text.hot (the
    // names carry hashes of the toolchain, dependencies and features, so a build with other
    // features or another rustc may have none of them; the patterns then do the work, as the
    // size check above shows).
    let script = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/hot-text.ld"))
        .expect("core/hot-text.ld");
    // Exact entries: no wildcard but ThinLTO's `.llvm.*` suffix, which symbols are compared
    // without.
    let exact: HashSet<&str> = script
        .lines()
        .filter_map(|l| l.trim().strip_prefix("*(.text."))
        .filter_map(|l| l.split_whitespace().next())
        .map(|name| name.strip_suffix(".llvm.*").unwrap_or(name))
        .filter(|name| !name.contains('*'))
        .collect();
    assert!(exact.len() > 1000, "the script lists its functions by name");
    // Two kinds of named functions cannot be moved and are left out: assembly (ring's, in the
    // `.text` of its objects, not one section per function; not Rust-mangled) and Rust
    // functions LLVM merged into an identical one (an alias: another symbol at its address).
    let hot_range = hot.addr..hot.addr + hot.size;
    let all_functions = functions(&elf, &secs);
    let mut at: HashMap<u64, usize> = HashMap::new();
    for (_, addr) in &all_functions {
        *at.entry(*addr).or_default() += 1;
    }
    let (mut present, mut outside) = (0, Vec::new());
    for &(ref name, addr) in &all_functions {
        let base = match name.rfind(".llvm.") {
            Some(i) if name[i + 6..].bytes().all(|b| b.is_ascii_digit()) => &name[..i],
            _ => name.as_str(),
        };
        if exact.contains(base) {
            present += 1;
            let rust = name.starts_with("_ZN") || name.starts_with("_R");
            if rust && at[&addr] == 1 && !hot_range.contains(&addr) {
                outside.push(name.clone());
            }
        }
    }
    assert!(
        outside.is_empty(),
        "{} of {present} functions the script names are outside .text.hot, e.g. {:?}",
        outside.len(),
        &outside[..outside.len().min(5)]
    );

    // The node proxy's relay, which every tunneled connection runs, is in .text.hot in any
    // build: its patterns carry no hash.
    let relay: Vec<_> = all_functions
        .iter()
        .filter(|(name, _)| {
            name.contains("9telemetry7ConnLog16tunnel_and_close28_$u7b$$u7b$closure")
        })
        .collect();
    assert!(!relay.is_empty(), "the binary has the relay's future");
    for (name, addr) in relay {
        assert!(hot_range.contains(addr), "{name} is outside .text.hot");
    }

    let relr = find(".relr.dyn").expect("relative relocations packed (.relr.dyn)");
    let rela = find(".rela.dyn").map_or(0, |s| s.size);
    assert!(
        rela < 64 << 10 && relr.size < 64 << 10,
        "relocations take {} + {} KiB",
        rela >> 10,
        relr.size >> 10
    );
}
