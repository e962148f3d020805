//! A pipeline written back as its canonical file.
//!
//! Canonical: resources in the order of the model, fields in the order of their structs, every
//! field that has a value written out (defaults included, so the file shows what applies),
//! absent options and empty lists and tables left out (and `storage_read_only` without a
//! `storage_root`, which the rules refuse). [`crate::parse`] reads the output back
//! to an equal [`Pipeline`].

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::Path;
use std::time::Duration;

use haven_engine::retention::{RetentionPolicy, format_duration};

use crate::decode::is_bare_key;
use crate::model::*;

/// Writes `p` as a pipeline file.
pub fn to_toml(p: &Pipeline) -> String {
    let mut w = Writer(String::new());
    w.int("version", u64::from(p.version));
    w.header("[deployment]");
    w.str("name", &p.deployment.name);
    w.opt_str("description", p.deployment.description.as_deref());
    for s in &p.sites {
        w.header("[[site]]");
        w.str("name", &s.name);
        w.opt_str("description", s.description.as_deref());
    }
    for g in &p.gateways {
        w.header("[[gateway]]");
        w.str("name", &g.name);
        w.str("site", &g.site);
        let roles: Vec<&str> = g.roles.iter().map(|r| r.name()).collect();
        w.list("roles", &roles);
        w.opt_str("address", g.address.as_deref());
        w.opt_str("api", g.api.as_deref());
    }
    for plugin in &p.plugins {
        w.header("[[plugin]]");
        w.str("name", &plugin.name);
        w.str("kind", plugin.kind.name());
        w.path("path", &plugin.path);
        w.nonempty_list("gateways", &plugin.gateways);
        let g = &plugin.grants;
        w.header("[plugin.grants]");
        if let Some(root) = &g.storage_root {
            w.path("storage_root", root);
            w.bool("storage_read_only", g.storage_read_only);
        }
        w.nonempty_list("http_hosts", &g.http_hosts);
        w.int("memory_mib", g.memory_mib);
        w.int("call_timeout_ms", g.call_timeout_ms);
        w.map("[plugin.settings]", &plugin.settings);
    }
    for policy in &p.policies {
        w.header("[[policy]]");
        w.str("name", policy.name());
        w.str("kind", policy.kind_name());
        match policy {
            Policy::Replication(rp) => {
                w.duration("rpo_threshold", rp.rpo_threshold);
                w.duration("crash_consistent_interval", rp.crash_consistent_interval);
                match rp.app_consistent_interval {
                    Some(d) => w.duration("app_consistent_interval", d),
                    None => w.str("app_consistent_interval", "off"),
                }
                w.duration("process_server_grace", rp.process_server_grace);
                w.header("[policy.retention]");
                w.retention(&rp.retention);
            }
            Policy::Failback(fp) => {
                w.bool("shutdown_replica", fp.shutdown_replica);
                w.bool("reprotect_after_failback", fp.reprotect_after_failback);
            }
        }
    }
    for m in &p.network_mappings {
        w.header("[[network_mapping]]");
        w.str("name", &m.name);
        w.str("source_site", &m.source_site);
        w.str("target_site", &m.target_site);
        w.str("source_network", &m.source_network);
        w.str("target_network", &m.target_network);
        w.str("test_network", &m.test_network);
    }
    for c in &p.cache_accounts {
        w.header("[[cache_account]]");
        w.str("name", &c.name);
        w.str("site", &c.site);
        w.str("container_url", &c.container_url);
        w.list("drained_by", &c.drained_by);
    }
    for m in &p.machines {
        w.header("[[machine]]");
        w.str("name", &m.name);
        w.str("site", &m.site);
        w.opt_str("platform", m.platform.as_deref());
        w.opt_str("target_platform", m.target_platform.as_deref());
        w.str("policy", &m.policy);
        w.opt_str("failback_policy", m.failback_policy.as_deref());
        w.opt_str("process_server", m.process_server.as_deref());
        w.opt_str("cache_account", m.cache_account.as_deref());
        w.str("master_target", &m.master_target);
        w.str("writer", &m.writer);
        w.nonempty_list("disks", &m.disks);
        w.map("[machine.target]", &m.target);
    }
    for g in &p.groups {
        w.header("[[group]]");
        w.str("name", &g.name);
        w.nonempty_list("machines", &g.machines);
        w.opt_str("policy", g.policy.as_deref());
    }
    for plan in &p.plans {
        w.header("[[plan]]");
        w.str("name", &plan.name);
        for step in &plan.steps {
            w.header("[[plan.step]]");
            w.str("kind", step.kind_name());
            match step {
                Step::Failover(f) => {
                    w.nonempty_list("machines", &f.machines);
                    w.nonempty_list("groups", &f.groups);
                    if f.continue_on_error {
                        w.bool("continue_on_error", true);
                    }
                }
                Step::Script(s) => {
                    w.str("run", &s.run);
                    w.duration("timeout", s.timeout);
                    if s.continue_on_error {
                        w.bool("continue_on_error", true);
                    }
                }
                Step::Manual(m) => w.str("message", &m.message),
            }
        }
    }
    for hook in &p.webhooks {
        w.header("[[webhook]]");
        w.str("name", &hook.name);
        w.str("url", &hook.url);
        w.list("events", &hook.events);
        w.str("min_severity", hook.min_severity.name());
    }
    w.0
}

struct Writer(String);

impl Writer {
    fn header(&mut self, header: &str) {
        let _ = write!(self.0, "\n{header}\n");
    }

    fn line(&mut self, key: &str, value: &str) {
        let _ = writeln!(self.0, "{} = {value}", key_text(key));
    }

    fn str(&mut self, key: &str, value: &str) {
        self.line(key, &quote(value));
    }

    fn opt_str(&mut self, key: &str, value: Option<&str>) {
        if let Some(v) = value {
            self.str(key, v);
        }
    }

    fn path(&mut self, key: &str, value: &Path) {
        self.str(key, &value.to_string_lossy());
    }

    fn int(&mut self, key: &str, value: u64) {
        self.line(key, &value.to_string());
    }

    fn bool(&mut self, key: &str, value: bool) {
        self.line(key, if value { "true" } else { "false" });
    }

    fn duration(&mut self, key: &str, value: Duration) {
        self.str(key, &format_duration(value));
    }

    fn list<S: AsRef<str>>(&mut self, key: &str, items: &[S]) {
        let items: Vec<String> = items.iter().map(|s| quote(s.as_ref())).collect();
        self.line(key, &format!("[{}]", items.join(", ")));
    }

    fn nonempty_list<S: AsRef<str>>(&mut self, key: &str, items: &[S]) {
        if !items.is_empty() {
            self.list(key, items);
        }
    }

    /// A table of strings under its own header, when it has any entry.
    fn map(&mut self, header: &str, map: &BTreeMap<String, String>) {
        if map.is_empty() {
            return;
        }
        self.header(header);
        for (k, v) in map {
            self.str(k, v);
        }
    }

    fn retention(&mut self, r: &RetentionPolicy) {
        self.duration("window", r.window);
        if r.tiers.is_empty() {
            self.line("tiers", "[]");
        } else {
            self.0.push_str("tiers = [\n");
            for t in &r.tiers {
                let _ = writeln!(
                    self.0,
                    "    {{ for_last = {}, every = {} }},",
                    quote(&format_duration(t.for_last)),
                    quote(&format_duration(t.every))
                );
            }
            self.0.push_str("]\n");
        }
        self.bool("prefer_app_consistent", r.prefer_app_consistent);
    }
}

fn key_text(key: &str) -> String {
    if is_bare_key(key) {
        key.to_string()
    } else {
        quote(key)
    }
}

/// `s` as a TOML basic string.
pub(crate) fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_escaped() {
        assert_eq!(quote("a\"b\\c\nd\u{7f}é"), "\"a\\\"b\\\\c\\nd\\u007Fé\"");
    }
}
