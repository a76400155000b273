//! Deny-all WASI.
//!
//! A Rust guest built for `wasm32-wasip2` imports WASI interfaces through its standard library
//! even when the policy never uses them. Each WASI function a plugin imports is defined here
//! from its type, answering as a host that has nothing to give:
//!
//! - files: no preopened directories, so every path fails; descriptors never exist;
//! - environment, arguments: empty; no working directory;
//! - sockets and name lookup: the `access-denied` error;
//! - wall clock and monotonic clock: zero (plugins get time only from `host.now-ns`);
//! - stdout/stderr: accepted and written to the proxy log under the policy's name;
//! - stdin and other input streams: closed;
//! - random: real random bytes (hash seeds need them, and they reveal nothing);
//! - `exit`: traps.
//!
//! Results are built generically: a `result` gets its error case (preferring a case named like
//! "access denied"), an `option` is none, a `list` is empty, numbers are zero, and a returned
//! resource is a fresh handle to nothing, whose methods answer the same way.

use super::bindings::HostState;
use std::hash::{BuildHasher, RandomState};
use wasmtime::component::types::{ComponentFunc, ComponentItem};
use wasmtime::component::{Component, Linker, ResourceDynamic, ResourceType, Type, Val};
use wasmtime::{Engine, StoreContextMut};

/// Error or variant cases chosen for a denial, in order of preference.
const DENIAL_CASES: [&str; 7] = [
    "access-denied",
    "access",
    "not-permitted",
    "closed",
    "unsupported",
    "not-supported",
    "no-entry",
];

/// Largest random buffer handed out in one call.
const MAX_RANDOM_BYTES: u64 = 1 << 16;

/// How one imported function answers.
#[derive(Debug, Clone, Copy)]
enum Answer {
    Deny,
    Exit,
    Random,
    StreamCheckWrite,
    StreamWrite,
    StreamOk,
}

fn answer(interface: &str, func: &str) -> Answer {
    let interface = interface.split('@').next().unwrap_or(interface);
    match (interface, func) {
        ("wasi:cli/exit", _) => Answer::Exit,
        ("wasi:random/random" | "wasi:random/insecure" | "wasi:random/insecure-seed", _) => {
            Answer::Random
        }
        ("wasi:io/streams", "[method]output-stream.check-write") => Answer::StreamCheckWrite,
        (
            "wasi:io/streams",
            "[method]output-stream.write" | "[method]output-stream.blocking-write-and-flush",
        ) => Answer::StreamWrite,
        (
            "wasi:io/streams",
            "[method]output-stream.flush" | "[method]output-stream.blocking-flush",
        ) => Answer::StreamOk,
        _ => Answer::Deny,
    }
}

/// Defines every `wasi:` import of `component` in `linker` as deny-all. Returns the first
/// import that is neither WASI nor `sluice:policy`, if any, for the caller to refuse.
pub(crate) fn add_to_linker(
    linker: &mut Linker<HostState>,
    engine: &Engine,
    component: &Component,
) -> wasmtime::Result<Option<String>> {
    let ty = component.component_type();
    // Resources seen so far: an interface that `use`s another's resource re-exports the same
    // type, which must not be defined twice.
    let mut seen: Vec<ResourceType> = Vec::new();
    let mut next_id: u32 = 0;
    for (name, item) in ty.imports(engine) {
        if name.starts_with("sluice:policy/") {
            continue;
        }
        let ComponentItem::ComponentInstance(instance) = item.ty else {
            return Ok(Some(name.to_string()));
        };
        if !name.starts_with("wasi:") {
            return Ok(Some(name.to_string()));
        }
        let mut li = linker.instance(name)?;
        for (func_name, export) in instance.exports(engine) {
            match export.ty {
                ComponentItem::Resource(rt) => {
                    if seen.contains(&rt) {
                        continue;
                    }
                    seen.push(rt);
                    li.resource(
                        func_name,
                        ResourceType::host_dynamic(next_id),
                        |_, _| Ok(()),
                    )?;
                    next_id += 1;
                }
                ComponentItem::ComponentFunc(_) => {
                    let how = answer(name, func_name);
                    li.func_new(func_name, move |store, ty, params, results| {
                        respond(how, store, &ty, params, results)
                    })?;
                }
                _ => {}
            }
        }
    }
    Ok(None)
}

/// Resource ids searched when a function returns a handle (WASI has a few dozen resources).
const MAX_RESOURCE_IDS: u32 = 256;

fn respond(
    how: Answer,
    mut store: StoreContextMut<'_, HostState>,
    ty: &ComponentFunc,
    params: &[Val],
    results: &mut [Val],
) -> wasmtime::Result<()> {
    // Handles passed in (e.g. `self` of a method) must be released before returning.
    for p in params {
        release(p, &mut store)?;
    }
    match how {
        Answer::Exit => wasmtime::bail!("plugin called exit"),
        Answer::Random => {
            for (slot, t) in results.iter_mut().zip(ty.results()) {
                *slot = random_value(&t, params);
            }
            return Ok(());
        }
        Answer::StreamCheckWrite => {
            if let Some(slot) = results.first_mut() {
                *slot = Val::Result(Ok(Some(Box::new(Val::U64(4096)))));
            }
            return Ok(());
        }
        Answer::StreamWrite => {
            if let Some(Val::List(bytes)) = params.get(1) {
                let bytes: Vec<u8> = bytes
                    .iter()
                    .filter_map(|v| if let Val::U8(b) = v { Some(*b) } else { None })
                    .collect();
                store.data_mut().plugin_output(&bytes);
            }
            if let Some(slot) = results.first_mut() {
                *slot = Val::Result(Ok(None));
            }
            return Ok(());
        }
        Answer::StreamOk => {
            if let Some(slot) = results.first_mut() {
                *slot = Val::Result(Ok(None));
            }
            return Ok(());
        }
        Answer::Deny => {}
    }
    for (slot, t) in results.iter_mut().zip(ty.results()) {
        *slot = deny(&t, &mut store)?;
    }
    Ok(())
}

fn release(v: &Val, store: &mut StoreContextMut<'_, HostState>) -> wasmtime::Result<()> {
    match v {
        Val::Resource(r) => r.resource_drop(&mut *store)?,
        Val::List(vs) | Val::Tuple(vs) => {
            for v in vs {
                release(v, store)?;
            }
        }
        Val::Record(fields) => {
            for (_, v) in fields {
                release(v, store)?;
            }
        }
        Val::Option(Some(v))
        | Val::Variant(_, Some(v))
        | Val::Result(Ok(Some(v)) | Err(Some(v))) => release(v, store)?,
        _ => {}
    }
    Ok(())
}

fn random_u64() -> u64 {
    RandomState::new().hash_one(std::time::Instant::now())
}

fn random_value(t: &Type, params: &[Val]) -> Val {
    match t {
        Type::U64 => Val::U64(random_u64()),
        Type::Tuple(tuple) => Val::Tuple(tuple.types().map(|t| random_value(&t, params)).collect()),
        Type::List(_) => {
            let len = match params.first() {
                Some(Val::U64(n)) => (*n).min(MAX_RANDOM_BYTES),
                _ => 0,
            };
            let mut out = Vec::with_capacity(len as usize);
            while (out.len() as u64) < len {
                for b in random_u64().to_le_bytes() {
                    if (out.len() as u64) < len {
                        out.push(Val::U8(b));
                    }
                }
            }
            Val::List(out)
        }
        _ => Val::U64(0),
    }
}

/// The answer of a host that has nothing: see the module docs.
fn deny(t: &Type, store: &mut StoreContextMut<'_, HostState>) -> wasmtime::Result<Val> {
    Ok(match t {
        Type::Bool => Val::Bool(false),
        Type::S8 => Val::S8(0),
        Type::U8 => Val::U8(0),
        Type::S16 => Val::S16(0),
        Type::U16 => Val::U16(0),
        Type::S32 => Val::S32(0),
        Type::U32 => Val::U32(0),
        Type::S64 => Val::S64(0),
        Type::U64 => Val::U64(0),
        Type::Float32 => Val::Float32(0.0),
        Type::Float64 => Val::Float64(0.0),
        Type::Char => Val::Char('\0'),
        Type::String => Val::String(String::new()),
        Type::List(_) => Val::List(Vec::new()),
        Type::Map(_) => Val::Map(Vec::new()),
        Type::Option(_) => Val::Option(None),
        Type::Flags(_) => Val::Flags(Vec::new()),
        Type::Record(r) => {
            let mut fields = Vec::new();
            for f in r.fields() {
                fields.push((f.name.to_string(), deny(&f.ty, store)?));
            }
            Val::Record(fields)
        }
        Type::Tuple(tuple) => {
            let mut vals = Vec::new();
            for t in tuple.types() {
                vals.push(deny(&t, store)?);
            }
            Val::Tuple(vals)
        }
        Type::Enum(e) => {
            let names: Vec<&str> = e.names().collect();
            let pick = DENIAL_CASES
                .iter()
                .find(|c| names.contains(c))
                .copied()
                .or_else(|| names.first().copied())
                .unwrap_or_default();
            Val::Enum(pick.to_string())
        }
        Type::Variant(v) => {
            let cases: Vec<_> = v.cases().map(|c| (c.name.to_string(), c.ty)).collect();
            let (name, payload) = DENIAL_CASES
                .iter()
                .find_map(|d| cases.iter().find(|(n, _)| n == d))
                .or_else(|| cases.iter().find(|(_, ty)| ty.is_none()))
                .or_else(|| cases.first())
                .ok_or_else(|| wasmtime::format_err!("empty variant"))?;
            let payload = match payload {
                Some(ty) => Some(Box::new(deny(ty, store)?)),
                None => None,
            };
            Val::Variant(name.clone(), payload)
        }
        Type::Result(r) => match r.err() {
            Some(e) => Val::Result(Err(Some(Box::new(deny(&e, store)?)))),
            None => Val::Result(Err(None)),
        },
        Type::Own(rt) => {
            let id = (0..MAX_RESOURCE_IDS)
                .find(|id| ResourceType::host_dynamic(*id) == *rt)
                .ok_or_else(|| wasmtime::format_err!("denied: cannot create this resource"))?;
            Val::Resource(ResourceDynamic::new_own(0, id).try_into_resource_any(&mut *store)?)
        }
        _ => wasmtime::bail!("denied: unsupported WASI result type"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_by_interface_ignore_versions() {
        assert!(matches!(
            answer("wasi:cli/exit@0.2.6", "exit"),
            Answer::Exit
        ));
        assert!(matches!(
            answer("wasi:random/insecure-seed@0.2.0", "insecure-seed"),
            Answer::Random
        ));
        assert!(matches!(
            answer(
                "wasi:io/streams@0.2.4",
                "[method]output-stream.blocking-write-and-flush"
            ),
            Answer::StreamWrite
        ));
        assert!(matches!(
            answer("wasi:filesystem/preopens@0.2.4", "get-directories"),
            Answer::Deny
        ));
    }
}
