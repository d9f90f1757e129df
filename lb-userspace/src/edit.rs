//! `mptcp-lb service add-vip|remove-vip`: edits the configuration file the way an
//! operator would by hand (comments and layout kept), so that the file stays the one
//! source of truth, then the daemon reloads it.

use anyhow::{Context as _, bail};
use toml_edit::{DocumentMut, Value};

use crate::config::parse_vip;

/// The `[[service]]` table named `name` in `doc`.
fn service<'a>(doc: &'a mut DocumentMut, name: &str) -> anyhow::Result<&'a mut toml_edit::Table> {
    let services = doc
        .get_mut("service")
        .and_then(|s| s.as_array_of_tables_mut())
        .context("the file has no [[service]]")?;
    services
        .iter_mut()
        .find(|t| t.get("name").and_then(|n| n.as_str()) == Some(name))
        .with_context(|| format!("no service named {name:?} in the file"))
}

/// The service's `vips` array.
fn vips<'a>(svc: &'a mut toml_edit::Table, name: &str) -> anyhow::Result<&'a mut toml_edit::Array> {
    svc.get_mut("vips")
        .and_then(|v| v.as_array_mut())
        .with_context(|| format!("service {name:?} has no vips list"))
}

/// `text` with `vip` added to service `name`'s VIPs (its other lines untouched).
pub fn add_vip(text: &str, name: &str, vip: &str) -> anyhow::Result<String> {
    let wanted = parse_vip(vip).map_err(anyhow::Error::msg)?;
    let mut doc: DocumentMut = text.parse().context("the file is not TOML")?;
    let svc = service(&mut doc, name)?;
    let list = vips(svc, name)?;
    if list
        .iter()
        .filter_map(Value::as_str)
        .any(|v| parse_vip(v).ok() == Some(wanted))
    {
        bail!("service {name:?} already has VIP {wanted}");
    }
    list.push(wanted.to_string());
    Ok(doc.to_string())
}

/// `text` with `vip` removed from service `name`'s VIPs.
pub fn remove_vip(text: &str, name: &str, vip: &str) -> anyhow::Result<String> {
    let wanted = parse_vip(vip).map_err(anyhow::Error::msg)?;
    let mut doc: DocumentMut = text.parse().context("the file is not TOML")?;
    let svc = service(&mut doc, name)?;
    let list = vips(svc, name)?;
    let at = list
        .iter()
        .position(|v| v.as_str().and_then(|v| parse_vip(v).ok()) == Some(wanted))
        .with_context(|| format!("service {name:?} has no VIP {wanted}"))?;
    list.remove(at);
    Ok(doc.to_string())
}

/// Replaces `path`'s contents with `text` in one step (a file beside, then a rename).
pub fn write_file(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let tmp = path.with_extension("toml.new");
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"# the pool
[balancer]
interface = "eth0"

[[service]]
name = "web"
# both families
vips = ["203.0.113.10:443/tcp", "[2001:db8::10]:443/tcp"]
  [[service.backend]]
  address = "10.0.1.11"

[[service]]
name = "dns"
vips = ["203.0.113.53:53/udp"]
"#;

    #[test]
    fn a_port_is_added_and_removed_keeping_the_rest_of_the_file() {
        let added = add_vip(FILE, "web", "203.0.113.10:80").expect("added");
        assert!(
            added.contains("# the pool") && added.contains("# both families"),
            "{added}"
        );
        assert!(
            added.contains(r#"vips = ["203.0.113.10:443/tcp", "[2001:db8::10]:443/tcp", "203.0.113.10:80/tcp"]"#),
            "{added}"
        );
        assert!(
            added.contains(r#"vips = ["203.0.113.53:53/udp"]"#),
            "{added}"
        );
        let removed = remove_vip(&added, "web", "203.0.113.10:80/tcp").expect("removed");
        assert_eq!(removed, FILE);
    }

    #[test]
    fn mistakes_are_named() {
        let e = add_vip(FILE, "web", "203.0.113.10:443").expect_err("present");
        assert!(
            e.to_string()
                .contains("already has VIP 203.0.113.10:443/tcp"),
            "{e}"
        );
        let e = add_vip(FILE, "mail", "203.0.113.10:25").expect_err("no service");
        assert!(e.to_string().contains("no service named \"mail\""), "{e}");
        let e = add_vip(FILE, "web", "203.0.113.10").expect_err("no port");
        assert!(e.to_string().contains("is not ADDRESS:PORT/PROTO"), "{e}");
        let e = remove_vip(FILE, "web", "203.0.113.10:8443").expect_err("absent");
        assert!(
            e.to_string().contains("has no VIP 203.0.113.10:8443/tcp"),
            "{e}"
        );
    }
}
