//! Reprotect and failback run by the configuration server, for a machine, a group or a plan
//! (their jobs are plan runs, see [`crate::plans`]), without naming agents or disks.
//!
//! A **reprotect** of a machine failed over at master target `F` (site `S`) needs three facts,
//! each found here:
//! - **where it goes**: a master target of the site the machine left (the site of the agent
//!   whose stream `F` held, else the pipeline machine's `site`, else the one other site with a
//!   master target) — the one holding an earlier item of the machine if any, else the
//!   pipeline's `master_target` if it is at that site, else the first by name;
//! - **the agent**: the one enrolled with this server for the machine's name at site `S` whose
//!   id no master target holds a stream of yet (the replica machine's own agent, enrolled
//!   there) — the newest if several;
//! - **the disks it left** there, disk by disk: the failover image of an earlier item of the
//!   machine at that master target (a round trip's way back), else the pipeline machine's
//!   `disks` (a physical server's devices), else the source machine's disk files as its
//!   platform's inventory saw them (`[datastore] path` → `path` below the writer's storage
//!   root).
//!
//! Then the seeds are recorded at the master target it goes to, and the item at `F` is marked
//! reprotected; the step's output names the images to start the agent on (`--seeded`).
//!
//! A **failback** of a reprotected machine is a failover in place at the master target that
//! holds it now, with its failback policy: `shutdown_replica` (default) makes it planned (the
//! agent's final point, nothing lost) and powers the replica machine off at its platform; the
//! source machine is powered on at its platform; `reprotect_after_failback` (default) ends it
//! with a reprotect the other way.

use std::collections::BTreeSet;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use haven_engine::config_server::{ConfigServer, GatewayView};
use haven_engine::placement::AgentRecord;
use haven_engine::recovery::{ItemInfo, ItemState};
use haven_net::join::ApiRequest;
use haven_pipeline::model::{FailbackPolicy, Machine, Pipeline, Policy};

/// The failback policy of `machine` in `p`: its `failback_policy`, or the defaults (the
/// replica shut down, the machine reprotected afterwards).
pub(crate) fn failback_policy(p: &Pipeline, machine: &str) -> FailbackPolicy {
    let named = p
        .machine(machine)
        .and_then(|m| m.failback_policy.as_deref())
        .and_then(|name| {
            p.policies.iter().find_map(|x| match x {
                Policy::Failback(f) if f.name == name => Some(f.clone()),
                _ => None,
            })
        });
    named.unwrap_or(FailbackPolicy {
        name: String::new(),
        shutdown_replica: true,
        reprotect_after_failback: true,
    })
}

/// What a reprotect of one machine found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Found {
    /// The master target it replicates to now.
    pub to: String,
    /// The agent that protects it where it runs.
    pub agent: String,
    /// The disk it left there, for each of its disks in order (as the seed takes it).
    pub targets: Vec<String>,
}

/// What [`find`] looks at.
pub(crate) struct Facts<'a> {
    pub machine: &'a str,
    /// The master target it failed over at.
    pub from: &'a str,
    /// Its items there (every disk), in disk order.
    pub items: &'a [ItemInfo],
    /// The gateways joined to this server.
    pub gateways: &'a [GatewayView],
    /// Every item of the machine at each master target (reprotected ones too).
    pub held: &'a [(String, Vec<ItemInfo>)],
    /// The agents enrolled with this server.
    pub agents: &'a [AgentRecord],
    /// Its pipeline entry, if any.
    pub entry: Option<&'a Machine>,
    /// Its source machine's disk locations at its platform (`[ds] path`), if known.
    pub inventory: Option<Vec<String>>,
}

fn site_of<'a>(gateways: &'a [GatewayView], name: &str) -> Option<&'a str> {
    gateways
        .iter()
        .find(|g| g.record.name == name)
        .map(|g| g.record.site.as_str())
}

fn is_master_target(g: &GatewayView) -> bool {
    g.record.roles.iter().any(|r| r == "master-target")
}

/// Decides where a failed-over machine replicates to, with which agent, onto which disks.
pub(crate) fn find(f: &Facts<'_>) -> Result<Found> {
    let machine = f.machine;
    let here = site_of(f.gateways, f.from)
        .with_context(|| format!("master target {} has not joined this server", f.from))?;
    // The site it left: its agent's, else the pipeline's, else the one other site.
    let fed_by: BTreeSet<&str> = f.items.iter().map(|i| i.agent_id.as_str()).collect();
    let agent_site = f
        .agents
        .iter()
        .filter(|a| fed_by.contains(a.id.as_str()))
        .find_map(|a| a.site.as_deref())
        .filter(|s| *s != here);
    let other_sites: BTreeSet<&str> = f
        .gateways
        .iter()
        .filter(|g| is_master_target(g) && g.record.site != here)
        .map(|g| g.record.site.as_str())
        .collect();
    let left = agent_site
        .or_else(|| {
            f.entry
                .map(|m| m.site.as_str())
                .filter(|s| *s != here && !s.is_empty())
        })
        .or_else(|| match other_sites.len() {
            1 => other_sites.first().copied(),
            _ => None,
        })
        .with_context(|| {
            format!(
                "the site {machine} left is not known: no enrolled agent of it says, the \
                 pipeline has no `site` for it other than {here}, and {} other site(s) have a \
                 master target",
                other_sites.len()
            )
        })?;
    // A master target there: one holding the machine before, else the pipeline's, else the
    // first by name.
    let mut there: Vec<&str> = f
        .gateways
        .iter()
        .filter(|g| is_master_target(g) && g.record.site == left)
        .map(|g| g.record.name.as_str())
        .collect();
    there.sort_unstable();
    let held_before = |g: &&&str| {
        f.held
            .iter()
            .any(|(name, items)| name == **g && !items.is_empty())
    };
    let to = there
        .iter()
        .find(held_before)
        .or_else(|| {
            there
                .iter()
                .find(|g| f.entry.is_some_and(|m| m.master_target == **g))
        })
        .or(there.first())
        .copied()
        .with_context(|| {
            format!(
                "no master target of site {left} (where {machine} came from) has joined this \
                 server: start one there with `[master_target]` and `[join]`"
            )
        })?;
    // The agent: enrolled for the machine where it runs now, and not yet replicating.
    let used: BTreeSet<&str> = f
        .held
        .iter()
        .flat_map(|(_, items)| items.iter().map(|i| i.agent_id.as_str()))
        .collect();
    let agent = f
        .agents
        .iter()
        .filter(|a| {
            a.machine_name == machine
                && a.site.as_deref() == Some(here)
                && !used.contains(a.id.as_str())
        })
        .max_by_key(|a| (a.assigned_ms, a.id.clone()))
        .map(|a| a.id.clone())
        .with_context(|| {
            format!(
                "no agent of {machine} at site {here} is enrolled and free: enroll the agent of \
                 the machine running there with this server (`haven-agent enroll \
                 --config-server … --site {here} --machine-name {machine}`), then reprotect \
                 again"
            )
        })?;
    // The disks it left there.
    let before: Vec<&ItemInfo> = f
        .held
        .iter()
        .filter(|(name, _)| name == to)
        .flat_map(|(_, items)| items)
        .filter(|i| {
            matches!(
                i.item.state,
                ItemState::FailedOver | ItemState::Committed | ItemState::Reprotected
            )
        })
        .collect();
    let mut targets = Vec::new();
    for (n, item) in f.items.iter().enumerate() {
        let earlier = before
            .iter()
            .filter(|i| i.disk == item.disk)
            .filter_map(|i| i.item.image.clone())
            .next_back();
        let listed = f.entry.and_then(|m| m.disks.get(n)).cloned();
        let inventory = f
            .inventory
            .as_ref()
            .and_then(|d| d.get(n))
            .and_then(|l| datastore_path(l));
        let target = earlier.or(listed).or(inventory).with_context(|| {
            format!(
                "the disk {machine} left at site {left} for its disk {} is not known: no \
                 earlier item of it at {to}, no `disks` in its pipeline entry, no disk file in \
                 its platform's inventory; list them in the pipeline (`disks = [...]`, in \
                 order) or use `haven reprotect {machine} --agent … --to … --target …`",
                item.disk
            )
        })?;
        targets.push(target);
    }
    Ok(Found {
        to: to.to_string(),
        agent,
        targets,
    })
}

/// `[datastore] folder/file.vmdk` → `folder/file.vmdk` (below the writer's storage root,
/// which is the datastore).
fn datastore_path(location: &str) -> Option<String> {
    let rest = location.strip_prefix('[')?;
    let (_, path) = rest.split_once(']')?;
    Some(path.trim().to_string()).filter(|p| !p.is_empty())
}

/// Every item of `machine` at every master target joined now, reprotected ones too.
/// The items of the master targets that answered, and the error of one that did not.
async fn held_everywhere(
    cs: &Arc<ConfigServer>,
    machine: &str,
) -> (Vec<(String, Vec<ItemInfo>)>, Option<anyhow::Error>) {
    let (mut held, mut failed) = (Vec::new(), None);
    for gateway in cs.with_role("master-target") {
        match crate::machines::all_items_of(cs, &gateway, machine).await {
            Ok(items) => held.push((gateway, items)),
            Err(e) => failed = Some(e.context(format!("listing the items at {gateway}"))),
        }
    }
    (held, failed)
}

/// The master target that holds `machine` now, asked afresh (a status report may not list a
/// stream that has just arrived): the one whose item is not reprotected, else any holding it.
pub(crate) async fn holder(cs: &Arc<ConfigServer>, machine: &str) -> Result<Option<String>> {
    let mut failed = None;
    // A master target that does not answer now may hold the current item: asked again.
    for _ in 0..3 {
        let held;
        (held, failed) = held_everywhere(cs, machine).await;
        let current = held
            .iter()
            .find(|(_, items)| items.iter().any(|i| i.item.state != ItemState::Reprotected));
        if let Some((g, _)) = current {
            return Ok(Some(g.clone()));
        }
        if failed.is_none() {
            return Ok(held
                .into_iter()
                .find(|(_, items)| !items.is_empty())
                .map(|(g, _)| g));
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
    Err(failed.expect("set when asked again"))
}

/// Calls `method path` at `gateway`; the answer's body, or its error (`HTTP STATUS: WHY`).
pub(crate) async fn call(
    cs: &ConfigServer,
    gateway: &str,
    method: &str,
    path: String,
) -> Result<String> {
    let answer = cs
        .forward(
            gateway,
            ApiRequest {
                method: method.into(),
                path,
                caller: String::new(),
            },
        )
        .await
        .map_err(|e| anyhow!("{e}"))?;
    if !(200..300).contains(&answer.status) {
        bail!(
            "HTTP {}: {}",
            answer.status,
            crate::deployment::error_text(&answer.body)
        );
    }
    Ok(answer.body)
}

fn seg(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// Reprotects `machine`, failed over at `gateway`: the seeds at the master target of the site
/// it left, then the item marked reprotected. The output names the agent and the images.
pub(crate) async fn reprotect_machine(
    cs: &Arc<ConfigServer>,
    gateway: &str,
    machine: &str,
    resumed: bool,
) -> Result<String> {
    let items = crate::machines::items_of(cs, gateway, machine).await?;
    if items.is_empty() {
        bail!("{gateway} holds no item of {machine}");
    }
    if resumed && items.iter().all(|i| i.item.state == ItemState::Reprotected) {
        return Ok(format!(
            "done before the configuration server restarted ({machine}: reprotected)"
        ));
    }
    if let Some(i) = items
        .iter()
        .find(|i| !matches!(i.item.state, ItemState::FailedOver | ItemState::Committed))
    {
        bail!(
            "{machine} disk {} is {} at {gateway}: only a failed-over machine is reprotected \
             (`haven failover {machine}` first)",
            i.disk,
            i.item.state.name()
        );
    }
    let held = match held_everywhere(cs, machine).await {
        (held, None) => held,
        (_, Some(e)) => return Err(e),
    };
    let (gateways, agents, p) = {
        let cs = cs.clone();
        tokio::task::spawn_blocking(move || -> Result<_> {
            Ok((cs.gateways()?, cs.agents(), crate::machines::pipeline(&cs)?))
        })
        .await??
    };
    let entry = p.machine(machine).cloned();
    let inventory = match entry.as_ref().and_then(|m| m.platform.clone()) {
        Some(platform) => {
            let (cs, name) = (cs.clone(), machine.to_string());
            tokio::task::spawn_blocking(move || cs.platform_machines(&platform))
                .await??
                .unwrap_or_default()
                .into_iter()
                .find(|m| m.name == name)
                .map(|m| m.disks.into_iter().map(|d| d.location).collect())
        }
        None => None,
    };
    let found = find(&Facts {
        machine,
        from: gateway,
        items: &items,
        gateways: &gateways,
        held: &held,
        agents: &agents,
        entry: entry.as_ref(),
        inventory,
    })?;
    for (i, target) in items.iter().zip(&found.targets) {
        let path = format!(
            "/v1/seeds?agent_id={}&disk={}&path={}&machine_name={}&from={}",
            seg(&found.agent),
            i.disk,
            seg(target),
            seg(machine),
            seg(gateway)
        );
        call(cs, &found.to, "POST", path)
            .await
            .with_context(|| format!("recording the seed of disk {} at {}", i.disk, found.to))?;
    }
    let path = format!("/v1/items/{}/reprotect?to={}", seg(machine), seg(&found.to));
    call(cs, gateway, "POST", path)
        .await
        .with_context(|| format!("marking {machine} reprotected at {gateway}"))?;
    let images: Vec<String> = items
        .iter()
        .map(|i| i.item.image.clone().unwrap_or_default())
        .collect();
    Ok(format!(
        "{machine} replicates to {} now: start agent {} with `haven-agent protect --seeded` on \
         {} (it sends only what differs from {})",
        found.to,
        found.agent,
        images.join(" "),
        found.targets.join(" ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use haven_engine::config_server::GatewayRecord;
    use haven_engine::recovery::ItemRecord;

    fn gateway(name: &str, site: &str, role: &str) -> GatewayView {
        GatewayView {
            record: GatewayRecord {
                name: name.into(),
                site: site.into(),
                roles: vec![role.into()],
                id: String::new(),
                first_seen_ms: 0,
                last_seen_ms: 0,
                contact: None,
            },
            connected: true,
            health: None,
            assignment_revision: 0,
            status: None,
        }
    }

    fn agent(id: &str, machine: &str, site: &str, at: u64) -> AgentRecord {
        AgentRecord {
            id: id.into(),
            machine_name: machine.into(),
            site: Some(site.into()),
            process_server: None,
            assigned_ms: at,
            moves: 0,
            last_seen_ms: at,
            connected: true,
        }
    }

    fn item(agent: &str, disk: u32, state: ItemState, image: Option<&str>) -> ItemInfo {
        let record = ItemRecord {
            state,
            image: image.map(str::to_string),
            ..ItemRecord::default()
        };
        ItemInfo {
            agent_id: agent.into(),
            machine_name: "web01".into(),
            disk,
            size: 1 << 20,
            item: record,
            points: 0,
            test_failover: None,
            journal_bytes: 0,
            applied_seq: Default::default(),
        }
    }

    fn sites() -> Vec<GatewayView> {
        vec![
            gateway("mt-b", "b", "master-target"),
            gateway("mt-a2", "a", "master-target"),
            gateway("mt-a", "a", "master-target"),
            gateway("ps-a", "a", "process-server"),
        ]
    }

    #[test]
    fn the_replica_machines_free_agent_replicates_onto_the_pipelines_disks() {
        let items = vec![
            item("aaa", 1, ItemState::FailedOver, Some("/r/1.raw")),
            item("aaa", 2, ItemState::FailedOver, Some("/r/2.raw")),
        ];
        let gateways = sites();
        let agents = vec![
            agent("aaa", "web01", "a", 1),
            agent("bbb", "web01", "b", 5),
            agent("ccc", "web01", "b", 9),
            agent("ddd", "db01", "b", 20),
        ];
        // ccc replicates somewhere already: bbb is the free one.
        let held = vec![
            ("mt-b".to_string(), items.clone()),
            (
                "mt-a2".to_string(),
                vec![item("ccc", 1, ItemState::Protected, None)],
            ),
        ];
        let mut entry: Machine =
            serde_json::from_value(serde_json::json!({"name": "web01", "site": "a",
                "master_target": "mt-b", "writer": "raw", "policy": "gold", "disks": ["/dev/sdb", "/dev/sdc"]}))
            .unwrap();
        let facts = Facts {
            machine: "web01",
            from: "mt-b",
            items: &items,
            gateways: &gateways,
            held: &held,
            agents: &agents,
            entry: Some(&entry),
            inventory: None,
        };
        let found = find(&facts).unwrap();
        // mt-a2 held web01 before (ccc's stream): it is where web01 goes.
        assert_eq!(
            found,
            Found {
                to: "mt-a2".into(),
                agent: "bbb".into(),
                targets: vec!["/dev/sdb".into(), "/dev/sdc".into()],
            }
        );
        // No disks listed: the platform's inventory names the files on the datastore.
        entry.disks.clear();
        let facts = Facts {
            machine: "web01",
            from: "mt-b",
            items: &items,
            gateways: &gateways,
            held: &held,
            agents: &agents,
            entry: Some(&entry),
            inventory: Some(vec!["[ds1] web01/web01.vmdk".into()]),
        };
        let e = find(&facts).unwrap_err().to_string();
        assert!(e.contains("for its disk 2 is not known"), "{e}");
        let facts = Facts {
            inventory: Some(vec![
                "[ds1] web01/web01.vmdk".into(),
                "[ds1] web01/web01_1.vmdk".into(),
            ]),
            ..facts
        };
        assert_eq!(
            find(&facts).unwrap().targets,
            vec!["web01/web01.vmdk", "web01/web01_1.vmdk"]
        );
    }

    #[test]
    fn the_way_back_replicates_onto_the_earlier_failover_image() {
        // web01 failed back to site a in place and failed over there: back to mt-b, onto
        // the image its first failover made.
        let items = vec![item("bbb", 1, ItemState::FailedOver, Some("/a/web01.raw"))];
        let gateways = sites();
        let agents = vec![
            agent("aaa", "web01", "a", 1),
            agent("bbb", "web01", "b", 5),
            agent("eee", "web01", "a", 30),
        ];
        let held = vec![
            (
                "mt-b".to_string(),
                vec![item("aaa", 1, ItemState::Reprotected, Some("/b/img.raw"))],
            ),
            ("mt-a".to_string(), items.clone()),
        ];
        let found = find(&Facts {
            machine: "web01",
            from: "mt-a",
            items: &items,
            gateways: &gateways,
            held: &held,
            agents: &agents,
            entry: None,
            inventory: None,
        })
        .unwrap();
        assert_eq!(
            found,
            Found {
                to: "mt-b".into(),
                agent: "eee".into(),
                targets: vec!["/b/img.raw".into()],
            }
        );
    }

    #[test]
    fn without_a_free_agent_it_says_what_to_enroll() {
        let items = vec![item("aaa", 1, ItemState::FailedOver, Some("/r/1.raw"))];
        let gateways = sites();
        let agents = vec![agent("aaa", "web01", "a", 1)];
        let held = vec![("mt-b".to_string(), items.clone())];
        let e = find(&Facts {
            machine: "web01",
            from: "mt-b",
            items: &items,
            gateways: &gateways,
            held: &held,
            agents: &agents,
            entry: None,
            inventory: None,
        })
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("no agent of web01 at site b is enrolled and free")
                && e.contains("--site b --machine-name web01"),
            "{e}"
        );
    }

    #[test]
    fn datastore_paths_lose_their_datastore() {
        assert_eq!(
            datastore_path("[LocalDS_0] vm1/disk.vmdk").as_deref(),
            Some("vm1/disk.vmdk")
        );
        assert_eq!(datastore_path("/dev/sda"), None);
        assert_eq!(datastore_path("[ds] "), None);
    }
}
