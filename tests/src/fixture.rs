//! Packet fixtures, Katran's habit: a table of {description, input, expected verdict,
//! expected output}, each run once through BPF_PROG_TEST_RUN, printed as
//! `#N description PASS/FAIL` with a hex diff on failure.

use aya::programs::{TestRun as _, TestRunOptions, Xdp};

pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

pub fn verdict_name(v: u32) -> &'static str {
    match v {
        XDP_ABORTED => "XDP_ABORTED",
        XDP_DROP => "XDP_DROP",
        XDP_PASS => "XDP_PASS",
        XDP_TX => "XDP_TX",
        XDP_REDIRECT => "XDP_REDIRECT",
        _ => "unknown",
    }
}

/// What the packet must look like after the program.
pub enum Output {
    /// Byte for byte what went in.
    Unchanged,
    /// Not compared: a packet dropped after the program rewrote it.
    Ignored,
    /// Exactly these bytes.
    Exactly(Vec<u8>),
}

pub struct Fixture {
    pub description: String,
    pub input: Vec<u8>,
    pub verdict: u32,
    pub output: Output,
}

/// The `xdp_md` a test run starts from: which interface the packet "arrived" on.
fn xdp_md(len: usize, ingress_ifindex: u32) -> [u8; 24] {
    let mut md = [0u8; 24];
    md[4..8].copy_from_slice(&(len as u32).to_ne_bytes()); // data_end
    md[12..16].copy_from_slice(&ingress_ifindex.to_ne_bytes());
    md
}

/// Runs one packet through the program, as if received on `ingress_ifindex` (0: the
/// namespace's loopback); returns the verdict and the packet as it left.
pub fn run_once(prog: &Xdp, input: &[u8], ingress_ifindex: u32) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; input.len() + 256];
    let md = xdp_md(input.len(), ingress_ifindex);
    let opts = TestRunOptions {
        data_in: Some(input),
        data_out: Some(&mut out),
        ctx_in: (ingress_ifindex != 0).then_some(&md[..]),
        repeat: 1,
        ..Default::default()
    };
    let res = prog.test_run(opts).expect("BPF_PROG_TEST_RUN");
    out.truncate(res.data_size_out as usize);
    (res.return_value, out)
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .chunks(16)
        .enumerate()
        .map(|(i, c)| {
            let h: Vec<String> = c.iter().map(|b| format!("{b:02x}")).collect();
            format!("    {:04x}  {}\n", i * 16, h.join(" "))
        })
        .collect()
}

/// Line-by-line hex of what was expected and what came out, marking lines that differ.
pub fn hex_diff(expected: &[u8], got: &[u8]) -> String {
    let (e, g) = (hex(expected), hex(got));
    let (el, gl): (Vec<&str>, Vec<&str>) = (e.lines().collect(), g.lines().collect());
    let mut s = format!(
        "    expected {} bytes / got {} bytes; lines that differ:\n",
        expected.len(),
        got.len()
    );
    let differing = (0..el.len().max(gl.len())).filter(|&i| el.get(i) != gl.get(i));
    for i in differing.take(12) {
        let a = el.get(i).copied().unwrap_or("");
        let b = gl.get(i).copied().unwrap_or("");
        s.push_str(&format!("  ! {a:<58} | {}\n", b.trim_start()));
    }
    s
}

/// Runs the table in order (later cases may depend on state earlier ones created) and
/// panics listing the failures.
pub fn run_table(prog: &Xdp, table: &[Fixture], ingress_ifindex: u32) {
    let mut failed = Vec::new();
    for (i, f) in table.iter().enumerate() {
        let n = i + 1;
        let (verdict, out) = run_once(prog, &f.input, ingress_ifindex);
        let expected = match &f.output {
            Output::Unchanged => &f.input,
            Output::Exactly(p) => p,
            Output::Ignored => &out,
        };
        let ok_verdict = verdict == f.verdict;
        let ok_packet = &out == expected;
        if ok_verdict && ok_packet {
            println!("#{n} {} PASS", f.description);
            continue;
        }
        println!("#{n} {} FAIL", f.description);
        if !ok_verdict {
            println!(
                "    verdict: expected {}, got {}",
                verdict_name(f.verdict),
                verdict_name(verdict)
            );
        }
        if !ok_packet {
            print!("{}", hex_diff(expected, &out));
        }
        failed.push(format!("#{n} {}", f.description));
    }
    assert!(
        failed.is_empty(),
        "{} fixture(s) failed: {}",
        failed.len(),
        failed.join(", ")
    );
}
