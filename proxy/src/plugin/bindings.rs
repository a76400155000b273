//! The host side of `wit/policy.wit`: the store's per-instance state, the `types` and `host`
//! imports, and the Rust shapes of the exported functions.
//!
//! Imports are defined by hand with typed functions rather than generated, so that string
//! arguments (bucket keys, header names) are read in place from the guest's memory instead of
//! being copied into a host `String` on every call. The export types are checked against each
//! plugin when it is loaded.

use super::limits::Limiter;
use super::shared::{PluginShared, PolicyState};
use super::MessageFacts;
use std::sync::Arc;
use wasmtime::component::{
    ComponentType, Lift, Linker, LinkerInstance, Lower, Resource, ResourceType, WasmStr,
};

/// The interface a plugin must export, with the version this host implements.
pub(crate) const EXPORT_INTERFACE: &str = "sluice:policy/policy@0.1.0";
pub(crate) const TYPES_INTERFACE: &str = "sluice:policy/types@0.1.0";
pub(crate) const HOST_INTERFACE: &str = "sluice:policy/host@0.1.0";

/// Messages in one call at most: a handle carries the index in its low 16 bits.
pub(crate) const MAX_CALL_MESSAGES: usize = 1 << 16;

/// Marker type of the `message` resource; its handles' `rep` encodes (call generation, index).
pub(crate) struct MessageRes;

/// `verdict` from `types`.
#[derive(ComponentType, Lift, Debug, Clone)]
#[component(variant)]
pub(crate) enum WitVerdict {
    #[component(name = "forward")]
    Forward,
    #[component(name = "delay")]
    Delay(u32),
    #[component(name = "shed")]
    Shed(String),
    #[component(name = "divert")]
    Divert(WitDivert),
}

/// `divert-target` from `types`.
#[derive(ComponentType, Lift, Debug, Clone)]
#[component(record)]
pub(crate) struct WitDivert {
    #[component(name = "exchange")]
    pub(crate) exchange: String,
    #[component(name = "routing-key")]
    pub(crate) routing_key: String,
}

/// `level` from `host`. Constructed only by lifting from the guest.
#[allow(dead_code)]
#[derive(ComponentType, Lift, Debug, Clone, Copy)]
#[component(enum)]
#[repr(u8)]
enum Level {
    #[component(name = "trace")]
    Trace,
    #[component(name = "debug")]
    Debug,
    #[component(name = "info")]
    Info,
    #[component(name = "warn")]
    Warn,
    #[component(name = "error")]
    Error,
}

/// `broker-signals` from `host`.
#[derive(ComponentType, Lower, Debug, Clone, Copy)]
#[component(record)]
struct WitSignals {
    #[component(name = "upstream-blocked")]
    upstream_blocked: bool,
    #[component(name = "blocked-connections")]
    blocked_connections: u32,
    #[component(name = "confirm-latency-ms")]
    confirm_latency_ms: f64,
    #[component(name = "nack-rate")]
    nack_rate: f64,
}

/// Bytes of plugin stdout/stderr kept until a newline; longer lines are cut.
const MAX_OUTPUT_LINE: usize = 1024;

/// The data of one instance's store.
pub(crate) struct HostState {
    pub(crate) limiter: Limiter,
    /// The messages of the call in progress; empty between calls. See [`HostState::begin`].
    messages: Vec<*const (dyn MessageFacts + 'static)>,
    generation: u16,
    name: Arc<str>,
    config: Arc<str>,
    state: Arc<PolicyState>,
    shared: Arc<PluginShared>,
    output: Vec<u8>,
}

// SAFETY: the only non-`Send` fields are the message pointers, which are set and cleared within
// one call on one thread (`begin`/`end`) and are never dereferenced between calls, so moving
// the store to another thread between calls moves no live reference.
unsafe impl Send for HostState {}

impl HostState {
    pub(crate) fn new(
        name: Arc<str>,
        config: Arc<str>,
        memory_limit: usize,
        state: Arc<PolicyState>,
        shared: Arc<PluginShared>,
    ) -> Self {
        Self {
            limiter: Limiter::new(memory_limit),
            messages: Vec::new(),
            generation: 0,
            name,
            config,
            state,
            shared,
            output: Vec::new(),
        }
    }

    /// Makes `msgs` readable by the guest until [`HostState::end`] and returns the handle rep
    /// of the first one (the others follow). The caller must call `end` before the borrow of
    /// `msgs` ends; [`super::policy`] does so with a guard that also runs on unwind.
    pub(crate) fn begin(&mut self, msgs: &[&dyn MessageFacts]) -> u32 {
        self.generation = self.generation.wrapping_add(1);
        self.messages.clear();
        self.messages.extend(msgs.iter().map(|m| {
            let p: *const (dyn MessageFacts + '_) = *m;
            // SAFETY: only the trait object's lifetime bound changes (same layout). The pointer
            // is dereferenced only by `message`, during this call, while the caller still
            // borrows `msgs`; `end` clears it before that borrow ends.
            unsafe {
                std::mem::transmute::<
                    *const (dyn MessageFacts + '_),
                    *const (dyn MessageFacts + 'static),
                >(p)
            }
        }));
        u32::from(self.generation) << 16
    }

    /// Forgets the messages of the call that just ended.
    pub(crate) fn end(&mut self) {
        self.messages.clear();
    }

    /// The message behind a handle, if the handle belongs to the call in progress.
    fn message(&self, rep: u32) -> wasmtime::Result<&dyn MessageFacts> {
        let generation = (rep >> 16) as u16;
        let index = (rep & 0xffff) as usize;
        match self.messages.get(index) {
            Some(p) if generation == self.generation => {
                // SAFETY: `messages` is only non-empty between `begin` and `end`, while the
                // caller of the Wasm call holds the borrow the pointer came from; the returned
                // reference cannot outlive `&self`, which cannot outlive the host call.
                Ok(unsafe { &**p })
            }
            _ => Err(wasmtime::format_err!(
                "message handle used outside the call that gave it"
            )),
        }
    }

    /// Plugin stdout/stderr: logged line by line, rate limited like `log`.
    pub(crate) fn plugin_output(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if b == b'\n' {
                self.flush_output();
            } else if self.output.len() < MAX_OUTPUT_LINE {
                self.output.push(b);
            }
        }
    }

    pub(crate) fn flush_output(&mut self) {
        if self.output.is_empty() {
            return;
        }
        if self.state.log_allowed(self.shared.now_ns()) {
            let line = String::from_utf8_lossy(&self.output);
            tracing::info!(target: "sluice::plugin", policy = %self.name, "plugin output: {line}");
        }
        self.output.clear();
    }
}

type Cx<'a> = wasmtime::StoreContextMut<'a, HostState>;
type Msg = Resource<MessageRes>;

fn text<'a>(s: &WasmStr, cx: &'a Cx<'_>) -> wasmtime::Result<std::borrow::Cow<'a, str>> {
    s.to_str(cx)
}

/// Defines `sluice:policy/types` and `sluice:policy/host` in `linker`.
pub(crate) fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    add_types(&mut linker.instance(TYPES_INTERFACE)?)?;
    add_host(&mut linker.instance(HOST_INTERFACE)?)
}

fn add_types(li: &mut LinkerInstance<'_, HostState>) -> wasmtime::Result<()> {
    // Handles refer to messages owned by the caller: dropping one frees nothing.
    li.resource("message", ResourceType::host::<MessageRes>(), |_, _| Ok(()))?;
    li.func_wrap("[method]message.protocol", |cx: Cx<'_>, (m,): (Msg,)| {
        Ok((cx.data().message(m.rep())?.protocol().to_owned(),))
    })?;
    li.func_wrap("[method]message.producer", |cx: Cx<'_>, (m,): (Msg,)| {
        Ok((cx.data().message(m.rep())?.producer().to_owned(),))
    })?;
    li.func_wrap("[method]message.vhost", |cx: Cx<'_>, (m,): (Msg,)| {
        Ok((cx.data().message(m.rep())?.vhost().to_owned(),))
    })?;
    li.func_wrap("[method]message.user", |cx: Cx<'_>, (m,): (Msg,)| {
        Ok((cx.data().message(m.rep())?.user().map(str::to_owned),))
    })?;
    li.func_wrap("[method]message.peer", |cx: Cx<'_>, (m,): (Msg,)| {
        Ok((cx.data().message(m.rep())?.peer(),))
    })?;
    li.func_wrap(
        "[method]message.client-property",
        |cx: Cx<'_>, (m, name): (Msg, WasmStr)| {
            let name = text(&name, &cx)?;
            Ok((cx.data().message(m.rep())?.client_property(&name),))
        },
    )?;
    li.func_wrap("[method]message.exchange", |cx: Cx<'_>, (m,): (Msg,)| {
        Ok((cx.data().message(m.rep())?.exchange().to_owned(),))
    })?;
    li.func_wrap("[method]message.routing-key", |cx: Cx<'_>, (m,): (Msg,)| {
        Ok((cx.data().message(m.rep())?.routing_key().to_owned(),))
    })?;
    li.func_wrap(
        "[method]message.property",
        |cx: Cx<'_>, (m, name): (Msg, WasmStr)| {
            let name = text(&name, &cx)?;
            Ok((cx.data().message(m.rep())?.property(&name),))
        },
    )?;
    li.func_wrap(
        "[method]message.header",
        |cx: Cx<'_>, (m, name): (Msg, WasmStr)| {
            let name = text(&name, &cx)?;
            Ok((cx.data().message(m.rep())?.header(&name),))
        },
    )?;
    li.func_wrap(
        "[method]message.header-names",
        |cx: Cx<'_>, (m,): (Msg,)| Ok((cx.data().message(m.rep())?.header_names(),)),
    )?;
    li.func_wrap("[method]message.body-size", |cx: Cx<'_>, (m,): (Msg,)| {
        Ok((cx.data().message(m.rep())?.body_size(),))
    })?;
    li.func_wrap(
        "[method]message.body",
        |cx: Cx<'_>, (m, offset, len): (Msg, u64, u32)| {
            Ok((cx.data().message(m.rep())?.body(offset, len),))
        },
    )?;
    Ok(())
}

fn add_host(li: &mut LinkerInstance<'_, HostState>) -> wasmtime::Result<()> {
    li.func_wrap(
        "try-acquire",
        |cx: Cx<'_>, (key, rate, burst): (WasmStr, f64, u32)| {
            let key = text(&key, &cx)?;
            let s = cx.data();
            let now = s.shared.now_ns();
            Ok((s
                .state
                .buckets
                .with(&key, |b| b.try_acquire(now, rate, burst)),))
        },
    )?;
    li.func_wrap("rate", |cx: Cx<'_>, (key,): (WasmStr,)| {
        let key = text(&key, &cx)?;
        let s = cx.data();
        let now = s.shared.now_ns();
        Ok((s.state.buckets.with(&key, |b| b.rate(now)),))
    })?;
    li.func_wrap("incr", |cx: Cx<'_>, (name, delta): (WasmStr, u64)| {
        let name = text(&name, &cx)?;
        cx.data().state.incr(&name, delta);
        Ok(())
    })?;
    li.func_wrap("signals", |cx: Cx<'_>, (): ()| {
        let s = cx.data().shared.signals().snapshot();
        Ok((WitSignals {
            upstream_blocked: s.upstream_blocked,
            blocked_connections: s.blocked_connections,
            confirm_latency_ms: s.confirm_latency_ms,
            nack_rate: s.nack_rate,
        },))
    })?;
    li.func_wrap("queue-depth", |cx: Cx<'_>, (queue,): (WasmStr,)| {
        let queue = text(&queue, &cx)?;
        Ok((cx.data().shared.signals().queue_depth(&queue),))
    })?;
    li.func_wrap("config", |cx: Cx<'_>, (): ()| {
        Ok((cx.data().config.to_string(),))
    })?;
    li.func_wrap("now-ns", |cx: Cx<'_>, (): ()| {
        Ok((cx.data().shared.now_ns(),))
    })?;
    li.func_wrap("log", |cx: Cx<'_>, (level, msg): (Level, WasmStr)| {
        let s = cx.data();
        if !s.state.log_allowed(s.shared.now_ns()) {
            return Ok(());
        }
        let msg = text(&msg, &cx)?;
        let policy = &*s.name;
        match level {
            Level::Trace => tracing::trace!(target: "sluice::plugin", policy, "{msg}"),
            Level::Debug => tracing::debug!(target: "sluice::plugin", policy, "{msg}"),
            Level::Info => tracing::info!(target: "sluice::plugin", policy, "{msg}"),
            Level::Warn => tracing::warn!(target: "sluice::plugin", policy, "{msg}"),
            Level::Error => tracing::error!(target: "sluice::plugin", policy, "{msg}"),
        }
        Ok(())
    })?;
    Ok(())
}
