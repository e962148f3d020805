//! Haven's sandboxed plugin host.
//!
//! Adapters and target writers are Wasm components implementing `haven:plugin@0.1.0`
//! (`wit/haven-plugin@0.1.0/`) or, for adapters, `haven:plugin@0.2.0` (which adds settings and
//! more platform calls). The host loads them from files (precompiled artefacts are cached,
//! see [`cache`]), refuses a component that imports a capability its [`Grants`] do not cover,
//! and runs every call under a CPU deadline (epoch interruption) and a memory limit. A trap, a
//! timeout or running out of memory is contained: the call fails with a [`PluginError`] naming
//! the plugin and the call, the instance is thrown away and a fresh one serves the next call.
//!
//! Architecture invariant: nothing here blocks on the network or spawns tasks; calls are
//! synchronous and the caller picks the thread (the engine runs them on blocking threads).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use wasmtime::component::{Component, Linker, ResourceAny, ResourceTable};
use wasmtime::{Config, Engine, ResourceLimiter, Store, Trap};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

mod adapter;
pub mod buffers;
pub mod cache;
pub mod grants;
mod stderr;
pub mod storage;
pub mod wit;
mod writer;

pub use adapter::{AdapterPlugin, platform};
pub use cache::{ArtifactCache, CacheOutcome};
pub use grants::Grants;
pub use writer::{Access, Disk, WriterPlugin};

use adapter::Versioned;
use grants::HttpGrant;
use storage::StorageGrant;
use wit::since_v0_1_0::adapter::{Adapter, AdapterPre};
pub(crate) use wit::since_v0_1_0::writer::haven::plugin::types::Error as WitError;
use wit::since_v0_1_0::writer::{TargetWriter, TargetWriterPre};
use wit::since_v0_2_0::adapter::{Adapter as AdapterV2, AdapterPre as AdapterV2Pre};

/// How often the epoch ticks; deadlines are whole ticks, so a call past its deadline stops
/// within one tick of it.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// The folder of installed plugins: `$HAVEN_PLUGIN_DIR`, else the first of `../lib/haven/plugins`
/// beside the running program, a development build's `target/wasm32-wasip2/release`, and
/// `/usr/lib/haven/plugins` that holds `haven_raw.wasm`.
pub fn default_plugin_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("HAVEN_PLUGIN_DIR") {
        return Some(d.into());
    }
    let exe = std::env::current_exe().ok()?;
    let bin = exe.parent()?;
    let candidates = [
        bin.join("../lib/haven/plugins"),
        bin.join("../wasm32-wasip2/release"),
        "/usr/lib/haven/plugins".into(),
    ];
    candidates
        .into_iter()
        .find(|d| d.join("haven_raw.wasm").exists())
}

/// A plugin to load: its name, its component file and what it is granted.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PluginSpec {
    /// Name used in logs, errors and metrics.
    pub name: String,
    /// Path of the component (`.wasm`).
    pub path: PathBuf,
    /// Capabilities and limits of each instance.
    #[serde(default)]
    pub grants: Grants,
    /// Settings the plugin reads through `haven:plugin/settings` (0.2.0): a vCenter URL, a user,
    /// a password already resolved from its secret.
    #[serde(default)]
    pub settings: BTreeMap<String, String>,
}

/// The plugin host: one wasmtime engine, its epoch ticker and the linkers of each world.
pub struct Host {
    engine: Engine,
    writer_linker: Linker<State>,
    adapter_linker: Linker<State>,
    adapter_v2_linker: Linker<State>,
    /// Every component this host loaded, and the folder of precompiled artefacts if any: each
    /// component is compiled at most once per host, however many plugins load it at once.
    cache: ArtifactCache,
    /// Shared with every loaded plugin, so deadlines keep ticking while any plugin lives.
    ticker: Arc<Ticker>,
}

struct Ticker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// When ticking started, and the ticks given to the engine so far.
    start: Instant,
    published: Arc<std::sync::atomic::AtomicU64>,
}

impl Ticker {
    /// Ticks the wall clock is ahead of the engine's epoch (a ticker thread woken late has not
    /// caught up yet): a deadline set now must count them too, or the catch-up would cut it
    /// short.
    fn lag(&self) -> u64 {
        let due = (self.start.elapsed().as_nanos() / EPOCH_TICK.as_nanos()) as u64;
        due.saturating_sub(self.published.load(Ordering::Acquire))
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Why a plugin could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("plugin `{plugin}`: cannot read component {path}: {source}")]
    Read {
        plugin: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("plugin `{plugin}`: {path} is not a valid component: {source:#}")]
    Compile {
        plugin: String,
        path: PathBuf,
        source: wasmtime::Error,
    },
    #[error("plugin `{plugin}` imports `{import}`, which is refused: {why}")]
    Refused {
        plugin: String,
        import: String,
        why: String,
    },
    #[error("plugin `{plugin}`: storage root {root} cannot be opened: {source}")]
    StorageRoot {
        plugin: String,
        root: PathBuf,
        source: std::io::Error,
    },
    #[error("plugin `{plugin}` does not implement the `{world}` world: {source:#}")]
    World {
        plugin: String,
        world: &'static str,
        source: wasmtime::Error,
    },
}

/// How a call into a plugin ended badly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrapKind {
    /// It ran past its deadline.
    Timeout(Duration),
    /// It tried to grow memory past its limit.
    OutOfMemory(u64),
    /// It trapped (a panic, an out-of-bounds access, …); the text is wasmtime's.
    Crash(String),
}

/// Why a call into a plugin failed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum PluginError {
    /// The plugin answered with an error.
    #[error("plugin `{plugin}` call `{call}` failed: {error}{}", denials_suffix(.denials))]
    Failed {
        plugin: String,
        call: &'static str,
        error: haven_image::Error,
        denials: Vec<String>,
    },
    /// The plugin trapped; the instance was replaced by a fresh one.
    #[error("plugin `{plugin}` call `{call}` {}; the instance was restarted", trap_text(.kind))]
    Trapped {
        plugin: String,
        call: &'static str,
        kind: TrapKind,
    },
    /// A disk handle from before a restart was used.
    #[error(
        "plugin `{plugin}` call `{call}`: the disk was opened by an instance that has since been restarted; open it again"
    )]
    Stale { plugin: String, call: &'static str },
    /// The host itself failed around the call.
    #[error("plugin `{plugin}` call `{call}`: host error: {message}")]
    Host {
        plugin: String,
        call: &'static str,
        message: String,
    },
}

fn denials_suffix(denials: &[String]) -> String {
    if denials.is_empty() {
        String::new()
    } else {
        format!(" (host refused: {})", denials.join("; "))
    }
}

fn trap_text(kind: &TrapKind) -> String {
    match kind {
        TrapKind::Timeout(d) => {
            format!("ran past its {} ms deadline and was stopped", d.as_millis())
        }
        TrapKind::OutOfMemory(limit) => {
            format!("ran out of memory (limit {} MiB)", limit >> 20)
        }
        TrapKind::Crash(text) => format!("trapped: {text}"),
    }
}

impl PluginError {
    /// The plugin's own error, when it answered with one.
    pub fn plugin_error(&self) -> Option<&haven_image::Error> {
        match self {
            Self::Failed { error, .. } => Some(error),
            _ => None,
        }
    }
}

/// The state of one plugin instance's store.
pub struct State {
    name: Arc<str>,
    table: ResourceTable,
    wasi: WasiCtx,
    http: WasiHttpCtx,
    http_grant: HttpGrant,
    storage: Option<StorageGrant>,
    settings: Arc<BTreeMap<String, String>>,
    /// The last of what the plugin wrote to stderr: the message of a panic, shown with its
    /// trap.
    stderr: stderr::Tail,
    limiter: MemoryLimiter,
    /// Files the plugin has open (bounded by `storage::MAX_OPEN_FILES`).
    open_files: usize,
    /// Bytes of buffers the plugin created and holds (bounded by `buffers::MAX_BUFFER_BYTES`).
    buffer_bytes: u64,
}

impl WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for State {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.http_grant,
        }
    }
}

/// Bounds linear memory (summed over every memory of the instance) and tables, and remembers
/// whether it refused a growth (a guest that runs out of memory then traps with `unreachable`;
/// this tells it apart from other traps).
struct MemoryLimiter {
    max_memory: usize,
    /// Bytes of linear memory the instance has, over all its memories.
    total: usize,
    refused: bool,
}

/// Most table elements an instance may have.
const MAX_TABLE_ELEMENTS: usize = 1 << 20;
/// Most host resources (buffers, files, WASI handles) one instance may hold.
const MAX_RESOURCES: usize = 4096;

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let after = self.total.saturating_add(desired.saturating_sub(current));
        let ok = after <= self.max_memory;
        if ok {
            self.total = after;
        }
        self.refused |= !ok;
        Ok(ok)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

impl wit::since_v0_1_0::writer::haven::plugin::types::Host for State {}

impl wit::since_v0_1_0::writer::haven::plugin::log::Host for State {
    fn log(
        &mut self,
        level: wit::since_v0_1_0::writer::haven::plugin::log::Level,
        message: String,
    ) -> wasmtime::Result<()> {
        use wit::since_v0_1_0::writer::haven::plugin::log::Level;
        let mut message = message;
        if message.len() > 4096 {
            let mut cut = 4096;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        let plugin = &*self.name;
        match level {
            Level::Trace => tracing::trace!(plugin, "{message}"),
            Level::Debug => tracing::debug!(plugin, "{message}"),
            Level::Info => tracing::info!(plugin, "{message}"),
            Level::Warn => tracing::warn!(plugin, "{message}"),
            Level::Error => tracing::error!(plugin, "{message}"),
        }
        Ok(())
    }
}

impl wit::since_v0_2_0::adapter::haven::plugin0_2_0::settings::Host for State {
    fn get(&mut self, name: String) -> wasmtime::Result<Option<String>> {
        Ok(self.settings.get(&name).cloned())
    }

    fn names(&mut self) -> wasmtime::Result<Vec<String>> {
        Ok(self.settings.keys().cloned().collect())
    }
}

impl wit::since_v0_1_0::writer::haven::plugin::clock::Host for State {
    fn now_ms(&mut self) -> wasmtime::Result<u64> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Ok(now.as_millis() as u64)
    }

    fn monotonic_ns(&mut self) -> wasmtime::Result<u64> {
        static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        Ok(ORIGIN.get_or_init(Instant::now).elapsed().as_nanos() as u64)
    }
}

/// Options of a [`Host`].
#[derive(Debug, Clone, Default)]
pub struct HostConfig {
    /// Folder of precompiled artefacts; `None` compiles each component once per [`Host`], at its
    /// first load.
    pub cache_dir: Option<PathBuf>,
}

impl Host {
    pub fn new(config: HostConfig) -> anyhow::Result<Self> {
        Self::build(config).map_err(|e| anyhow::anyhow!("cannot start the plugin host: {e:#}"))
    }

    fn build(config: HostConfig) -> wasmtime::Result<Self> {
        let mut c = Config::new();
        c.epoch_interruption(true);
        c.wasm_component_model(true);
        c.cranelift_opt_level(wasmtime::OptLevel::Speed);
        let engine = Engine::new(&c)?;

        let mut writer_linker = Linker::<State>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut writer_linker)?;
        TargetWriter::add_to_linker::<State, wasmtime::component::HasSelf<State>>(
            &mut writer_linker,
            |s| s,
        )?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_sync(&mut writer_linker)?;
        wit::since_v0_2_0::adapter::haven::plugin0_2_0::settings::add_to_linker::<
            State,
            wasmtime::component::HasSelf<State>,
        >(&mut writer_linker, |s| s)?;

        let mut adapter_linker = Linker::<State>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut adapter_linker)?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_sync(&mut adapter_linker)?;
        use wit::since_v0_1_0::writer::haven::plugin as haven;
        type Me = wasmtime::component::HasSelf<State>;
        haven::types::add_to_linker::<State, Me>(&mut adapter_linker, |s| s)?;
        haven::buffers::add_to_linker::<State, Me>(&mut adapter_linker, |s| s)?;
        haven::log::add_to_linker::<State, Me>(&mut adapter_linker, |s| s)?;
        haven::clock::add_to_linker::<State, Me>(&mut adapter_linker, |s| s)?;

        // 0.2.0 adapters import the same 0.1.0 interfaces, plus settings.
        let mut adapter_v2_linker = Linker::<State>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut adapter_v2_linker)?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_sync(&mut adapter_v2_linker)?;
        haven::types::add_to_linker::<State, Me>(&mut adapter_v2_linker, |s| s)?;
        haven::buffers::add_to_linker::<State, Me>(&mut adapter_v2_linker, |s| s)?;
        haven::log::add_to_linker::<State, Me>(&mut adapter_v2_linker, |s| s)?;
        haven::clock::add_to_linker::<State, Me>(&mut adapter_v2_linker, |s| s)?;
        wit::since_v0_2_0::adapter::haven::plugin0_2_0::settings::add_to_linker::<State, Me>(
            &mut adapter_v2_linker,
            |s| s,
        )?;

        let stop = Arc::new(AtomicBool::new(false));
        let start = Instant::now();
        let published = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let thread = {
            let engine = engine.clone();
            let stop = stop.clone();
            let published = published.clone();
            std::thread::Builder::new()
                .name("haven-epoch".into())
                .spawn(move || {
                    // The epoch follows the wall clock (one tick per EPOCH_TICK since start), so a
                    // late wake-up is caught up at once instead of stretching every deadline.
                    let mut ticks: u128 = 0;
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(EPOCH_TICK);
                        let due = start.elapsed().as_nanos() / EPOCH_TICK.as_nanos();
                        while ticks < due {
                            engine.increment_epoch();
                            ticks += 1;
                            published.store(ticks as u64, Ordering::Release);
                        }
                    }
                })?
        };
        let cache = ArtifactCache::new(&engine, config.cache_dir);
        Ok(Self {
            engine,
            writer_linker,
            adapter_linker,
            adapter_v2_linker,
            cache,
            ticker: Arc::new(Ticker {
                stop,
                thread: Some(thread),
                start,
                published,
            }),
        })
    }

    /// Reads, compiles (or loads precompiled) and checks the imports of a component.
    fn component(&self, spec: &PluginSpec) -> Result<(Component, CacheOutcome), LoadError> {
        let wasm = std::fs::read(&spec.path).map_err(|source| LoadError::Read {
            plugin: spec.name.clone(),
            path: spec.path.clone(),
            source,
        })?;
        let (component, outcome) = self
            .cache
            .load(&wasm)
            .map_err(|source| LoadError::Compile {
                plugin: spec.name.clone(),
                path: spec.path.clone(),
                source,
            })?;
        for (import, _) in component.component_type().imports(&self.engine) {
            if let Some(why) = grants::refuse_import(import, &spec.grants) {
                return Err(LoadError::Refused {
                    plugin: spec.name.clone(),
                    import: import.to_owned(),
                    why,
                });
            }
        }
        Ok((component, outcome))
    }

    /// The imports of the component at `path`, for operators (`haven plugin inspect`).
    pub fn imports(&self, path: &std::path::Path) -> anyhow::Result<Vec<String>> {
        let wasm = std::fs::read(path)
            .map_err(|e| anyhow::anyhow!("cannot read component {}: {e}", path.display()))?;
        let component = Component::new(&self.engine, &wasm)
            .map_err(|e| anyhow::anyhow!("{} is not a valid component: {e:#}", path.display()))?;
        Ok(component
            .component_type()
            .imports(&self.engine)
            .map(|(name, _)| name.to_owned())
            .collect())
    }

    fn runner<W: World>(
        &self,
        spec: &PluginSpec,
        linker: &Linker<State>,
    ) -> Result<Runner<W>, LoadError> {
        let (component, outcome) = self.component(spec)?;
        let world_error = |source: wasmtime::Error| LoadError::World {
            plugin: spec.name.clone(),
            world: W::NAME,
            source,
        };
        let pre = linker.instantiate_pre(&component).map_err(world_error)?;
        let pre = W::pre(pre).map_err(world_error)?;
        let mut runner = Runner {
            engine: self.engine.clone(),
            spec: Arc::new(spec.clone()),
            settings: Arc::new(spec.settings.clone()),
            name: spec.name.as_str().into(),
            pre,
            live: None,
            dead: None,
            generation: 0,
            outcome,
            ticker: self.ticker.clone(),
        };
        // Instantiate now, so a component that cannot run is refused at load, not at first use.
        runner.instantiate().map_err(|e| match e {
            RunnerError::Storage(source) => LoadError::StorageRoot {
                plugin: spec.name.clone(),
                root: spec.grants.storage_root.clone().unwrap_or_default(),
                source,
            },
            RunnerError::Wasm(source) => world_error(source),
        })?;
        Ok(runner)
    }

    /// Loads a target writer. Both contract versions export 0.1.0's `writer`; a 0.2.0 writer may
    /// also import settings and outgoing HTTP, which this linker provides.
    pub fn load_writer(&self, spec: &PluginSpec) -> Result<WriterPlugin, LoadError> {
        Ok(WriterPlugin::new(self.runner(spec, &self.writer_linker)?))
    }

    /// Loads an adapter built against either contract version (told apart by the `platform`
    /// interface it exports).
    pub fn load_adapter(&self, spec: &PluginSpec) -> Result<AdapterPlugin, LoadError> {
        let (component, _) = self.component(spec)?;
        let v2 = component
            .component_type()
            .exports(&self.engine)
            .any(|(name, _)| name == "haven:plugin/platform@0.2.0");
        let inner = if v2 {
            Versioned::V2(self.runner::<AdapterV2>(spec, &self.adapter_v2_linker)?)
        } else {
            Versioned::V1(self.runner::<Adapter>(spec, &self.adapter_linker)?)
        };
        Ok(AdapterPlugin { inner })
    }
}

/// A world's bindings, as the runner needs them.
pub(crate) trait World: Sized {
    const NAME: &'static str;
    /// Calls the `plugin.describe` export (each world's bindings have their own types).
    fn describe(&self, store: &mut Store<State>) -> wasmtime::Result<PluginInfo>;
    type Pre;
    fn pre(pre: wasmtime::component::InstancePre<State>) -> wasmtime::Result<Self::Pre>;
    fn instantiate(pre: &Self::Pre, store: &mut Store<State>) -> wasmtime::Result<Self>;
}

/// Converts a `plugin-info` record of any world's bindings.
macro_rules! plugin_info {
    ($info:expr) => {{
        let i = $info;
        PluginInfo {
            name: i.name,
            version: i.version,
            description: i.description,
            kinds: i.kinds,
        }
    }};
}

impl World for TargetWriter {
    const NAME: &'static str = "target-writer";
    fn describe(&self, store: &mut Store<State>) -> wasmtime::Result<PluginInfo> {
        Ok(plugin_info!(
            self.haven_plugin_plugin().call_describe(store)?
        ))
    }
    type Pre = TargetWriterPre<State>;
    fn pre(pre: wasmtime::component::InstancePre<State>) -> wasmtime::Result<Self::Pre> {
        TargetWriterPre::new(pre)
    }
    fn instantiate(pre: &Self::Pre, store: &mut Store<State>) -> wasmtime::Result<Self> {
        pre.instantiate(store)
    }
}

impl World for Adapter {
    const NAME: &'static str = "adapter";
    fn describe(&self, store: &mut Store<State>) -> wasmtime::Result<PluginInfo> {
        Ok(plugin_info!(
            self.haven_plugin_plugin().call_describe(store)?
        ))
    }
    type Pre = AdapterPre<State>;
    fn pre(pre: wasmtime::component::InstancePre<State>) -> wasmtime::Result<Self::Pre> {
        AdapterPre::new(pre)
    }
    fn instantiate(pre: &Self::Pre, store: &mut Store<State>) -> wasmtime::Result<Self> {
        pre.instantiate(store)
    }
}

impl World for AdapterV2 {
    const NAME: &'static str = "adapter";
    fn describe(&self, store: &mut Store<State>) -> wasmtime::Result<PluginInfo> {
        Ok(plugin_info!(
            self.haven_plugin0_1_0_plugin().call_describe(store)?
        ))
    }
    type Pre = AdapterV2Pre<State>;
    fn pre(pre: wasmtime::component::InstancePre<State>) -> wasmtime::Result<Self::Pre> {
        AdapterV2Pre::new(pre)
    }
    fn instantiate(pre: &Self::Pre, store: &mut Store<State>) -> wasmtime::Result<Self> {
        pre.instantiate(store)
    }
}

enum RunnerError {
    Storage(std::io::Error),
    Wasm(wasmtime::Error),
}

struct Live<W> {
    store: Store<State>,
    bindings: W,
}

/// One plugin instance, replaced by a fresh one after a trap.
pub(crate) struct Runner<W: World> {
    engine: Engine,
    spec: Arc<PluginSpec>,
    settings: Arc<BTreeMap<String, String>>,
    name: Arc<str>,
    pre: W::Pre,
    live: Option<Live<W>>,
    /// The instance that trapped in the last call, kept until the next call so the caller can
    /// take back what it lent to it.
    dead: Option<Live<W>>,
    /// Bumped at every restart; handles carry the generation they were made in.
    generation: u64,
    outcome: CacheOutcome,
    ticker: Arc<Ticker>,
}

impl<W: World> Runner<W> {
    fn instantiate(&mut self) -> Result<(), RunnerError> {
        let grants = &self.spec.grants;
        let storage = match &grants.storage_root {
            Some(root) => Some(
                StorageGrant::new(root, grants.storage_read_only, &grants.devices)
                    .map_err(RunnerError::Storage)?,
            ),
            None => None,
        };
        let mut table = ResourceTable::new();
        table.set_max_capacity(MAX_RESOURCES);
        let stderr = stderr::Tail::default();
        let state = State {
            name: self.name.clone(),
            table,
            // Nothing: no arguments, environment, preopened folders, sockets or stdin; stdout
            // is discarded and stderr kept (bounded) for the message of a panic.
            wasi: WasiCtx::builder()
                .allow_tcp(false)
                .allow_udp(false)
                .allow_ip_name_lookup(false)
                .stderr(stderr.clone())
                .build(),
            stderr,
            http: WasiHttpCtx::new(),
            http_grant: HttpGrant {
                plugin: self.name.clone(),
                hosts: grants.http_hosts.clone(),
                denials: Vec::new(),
                max_wait: Duration::from_millis(grants.call_timeout_ms.max(1)),
            },
            storage,
            settings: self.settings.clone(),
            limiter: MemoryLimiter {
                max_memory: (grants.memory_mib << 20) as usize,
                total: 0,
                refused: false,
            },
            open_files: 0,
            buffer_bytes: 0,
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limiter);
        store.epoch_deadline_trap();
        store.set_epoch_deadline(self.deadline_ticks());
        let bindings = W::instantiate(&self.pre, &mut store).map_err(RunnerError::Wasm)?;
        self.live = Some(Live { store, bindings });
        Ok(())
    }

    fn deadline_ticks(&self) -> u64 {
        // One tick more than the timeout: the epoch is not aligned with the call's start, so
        // the call gets at least its timeout and at most one tick beyond it; plus the ticks a
        // late ticker still owes the engine, which it adds at once when it wakes.
        let timeout = self.spec.grants.call_timeout_ms.max(1);
        timeout.div_ceil(EPOCH_TICK.as_millis() as u64) + 1 + self.ticker.lag()
    }

    fn host_error(&self, call: &'static str, message: impl std::fmt::Display) -> PluginError {
        PluginError::Host {
            plugin: self.name.to_string(),
            call,
            message: message.to_string(),
        }
    }

    /// Runs `f` against the live instance under the call's deadline. A trap ends the instance:
    /// the call fails with [`PluginError::Trapped`] and a fresh instance is made for the next.
    fn call<T>(
        &mut self,
        call: &'static str,
        f: impl FnOnce(&W, &mut Store<State>) -> wasmtime::Result<Result<T, WitError>>,
    ) -> Result<T, PluginError> {
        self.dead = None;
        if self.live.is_none() {
            self.restart(call)?;
        }
        let ticks = self.deadline_ticks();
        let live = self.live.as_mut().expect("instantiated above");
        live.store.set_epoch_deadline(ticks);
        live.store.data_mut().limiter.refused = false;
        live.store.data_mut().http_grant.denials.clear();
        // A trap shows what the plugin wrote during this call only.
        live.store.data().stderr.take();
        match f(&live.bindings, &mut live.store) {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => Err(PluginError::Failed {
                plugin: self.name.to_string(),
                call,
                error: from_wit(error),
                denials: std::mem::take(&mut live.store.data_mut().http_grant.denials),
            }),
            Err(e) => {
                let kind = if e.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
                    TrapKind::Timeout(Duration::from_millis(self.spec.grants.call_timeout_ms))
                } else if live.store.data().limiter.refused {
                    TrapKind::OutOfMemory(self.spec.grants.memory_mib << 20)
                } else {
                    tracing::debug!(plugin = %self.name, call, "trap: {e:?}");
                    TrapKind::Crash(crash_text(&e, &live.store.data().stderr.take()))
                };
                let error = PluginError::Trapped {
                    plugin: self.name.to_string(),
                    call,
                    kind,
                };
                tracing::error!(plugin = %self.name, call, "{error}");
                self.dead = self.live.take();
                // Replace the instance now so the next call does not pay for it; if that fails
                // the next call tries again and reports why.
                let _ = self.restart(call);
                Err(error)
            }
        }
    }

    /// What the plugin says about itself.
    fn describe(&mut self) -> Result<PluginInfo, PluginError> {
        self.call("plugin.describe", |b, s| Ok(Ok(b.describe(s)?)))
    }

    fn restart(&mut self, call: &'static str) -> Result<(), PluginError> {
        self.generation += 1;
        self.instantiate().map_err(|e| match e {
            RunnerError::Storage(e) => {
                self.host_error(call, format!("storage root cannot be opened: {e}"))
            }
            RunnerError::Wasm(e) => self.host_error(call, format!("cannot instantiate: {e:#}")),
        })
    }

    /// The store, for host-side bookkeeping between calls (resources, tables).
    fn store(&mut self) -> Option<&mut Store<State>> {
        self.live.as_mut().map(|l| &mut l.store)
    }

    /// The store of generation `generation`: the live one, or the one that just trapped.
    fn store_of(&mut self, generation: u64) -> Option<&mut Store<State>> {
        if generation == self.generation {
            self.live.as_mut().map(|l| &mut l.store)
        } else if generation + 1 == self.generation {
            self.dead.as_mut().map(|l| &mut l.store)
        } else {
            None
        }
    }

    fn check_generation(&self, generation: u64, call: &'static str) -> Result<(), PluginError> {
        if generation == self.generation && self.live.is_some() {
            Ok(())
        } else {
            Err(PluginError::Stale {
                plugin: self.name.to_string(),
                call,
            })
        }
    }
}

/// A trap in one line: what trapped and in which function of the plugin's own code (the
/// innermost frame that is not the language's runtime), without the whole backtrace.
fn crash_text(e: &wasmtime::Error, stderr: &[u8]) -> String {
    let what = e.root_cause().to_string();
    let runtime = [
        "std::",
        "core::",
        "alloc::",
        "__rustc",
        "abort",
        "wit_bindgen",
        "_cabi",
    ];
    let frame = e.downcast_ref::<wasmtime::WasmBacktrace>().and_then(|bt| {
        bt.frames()
            .iter()
            .filter_map(|f| f.func_name())
            // `{:#}`: demangled, without Rust's symbol hash.
            .map(|name| format!("{:#}", rustc_demangle::demangle(name)))
            .find(|name| !runtime.iter().any(|r| name.contains(r)))
    });
    let mut text = match frame {
        Some(f) => format!("{what} (in {f})"),
        None => what,
    };
    // The last panic message the plugin printed, on one line.
    let stderr = String::from_utf8_lossy(stderr);
    if let Some(at) = stderr.rfind("panicked at") {
        let message: String = stderr[at..]
            .lines()
            .take_while(|l| !l.starts_with("note:"))
            .collect::<Vec<_>>()
            .join(" ");
        let message: String = message.chars().take(1024).collect();
        text = format!("{text}: {}", message.trim());
    }
    text
}

/// Converts the contract's error variant into a Haven error.
pub(crate) fn from_wit(e: WitError) -> haven_image::Error {
    use haven_image::{Error, ErrorKind as K};
    let (kind, message) = match e {
        WitError::InvalidArgument(m) => (K::InvalidArgument, m),
        WitError::NotFound(m) => (K::NotFound, m),
        WitError::AlreadyExists(m) => (K::AlreadyExists, m),
        WitError::Unsupported(m) => (K::Unsupported, m),
        WitError::Corrupt(m) => (K::Corrupt, m),
        WitError::Denied(m) => (K::Denied, m),
        WitError::Io(m) => (K::Io, m),
        WitError::Platform(m) => (K::Io, format!("platform: {m}")),
        WitError::Limit(m) => (K::Limit, m),
    };
    Error::new(kind, message)
}

/// What a plugin says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginInfo {
    pub name: String,
    pub version: String,
    pub description: String,
    pub kinds: Vec<String>,
}

/// Returns `resource` to the guest's table for dropping, ignoring a dead instance.
pub(crate) fn drop_resource(store: &mut Store<State>, resource: ResourceAny) {
    let _ = resource.resource_drop(store);
}
