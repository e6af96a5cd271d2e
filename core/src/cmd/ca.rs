//! `zring ca init|issue`: a local certificate authority for tests, demos and clusters without
//! istiod.

use std::path::Path;

use anyhow::Context;
use zring_hbone::{ca::LocalCa, SpiffeId};

/// `zring ca init --dir DIR`.
pub fn init(dir: &Path, trust_domain: &str) -> anyhow::Result<()> {
    let ca = LocalCa::init_dir(dir, trust_domain)?;
    println!(
        "created a root CA for trust domain {trust_domain} in {}",
        dir.display()
    );
    println!(
        "  {}/root-cert.pem (share as the trust bundle)",
        dir.display()
    );
    println!("  {}/root-key.pem (keep private; mode 0600)", dir.display());
    drop(ca);
    Ok(())
}

/// `zring ca issue --dir DIR --spiffe ID --out PREFIX [--ttl SECS]`.
pub fn issue(
    dir: &Path,
    id: &SpiffeId,
    prefix: &str,
    ttl: std::time::Duration,
) -> anyhow::Result<()> {
    let ca =
        LocalCa::load_dir(dir).with_context(|| format!("loading the CA in {}", dir.display()))?;
    let paths = ca.issue_to_files(id, ttl, prefix)?;
    println!("issued a certificate for {id}, valid {}s:", ttl.as_secs());
    for p in paths {
        println!("  {}", p.display());
    }
    Ok(())
}
