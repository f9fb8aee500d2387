//! Weights in and out: Meta's SAM / LiteMedSAM / official DeSAM `.pth` (zip + pickle, read in Rust
//! with a small pickle interpreter), and safetensors (f32/f16/bf16). Must not execute arbitrary
//! pickle code, import Python, or know what the model looks like beyond VarStore names and shapes.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use tch::{nn, Device, Kind, Tensor};

/// Why weights could not be read, written or loaded. Every message is one line and names the file
/// or the state-dict key at fault.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: cannot read: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {problem}")]
    Format { path: PathBuf, problem: String },
    #[error("checkpoint lacks {} tensor(s) the model needs: {}", keys.len(), preview(keys))]
    Missing { keys: Vec<String> },
    #[error("{key}: checkpoint has shape {found:?} but the model expects {expected:?} (a checkpoint for another architecture?)")]
    Shape { key: String, expected: Vec<i64>, found: Vec<i64> },
    #[error("{0}")]
    Other(String),
}

fn preview(keys: &[String]) -> String {
    const SHOWN: usize = 4;
    let mut s = keys.iter().take(SHOWN).cloned().collect::<Vec<_>>().join(", ");
    if keys.len() > SHOWN {
        s.push_str(&format!(" (and {} more)", keys.len() - SHOWN));
    }
    s
}

fn format_err(path: &Path, problem: impl Into<String>) -> CheckpointError {
    CheckpointError::Format { path: path.to_path_buf(), problem: problem.into() }
}

/// What loading into a VarStore did.
#[derive(Debug, Default, Clone)]
pub struct LoadReport {
    pub loaded: usize,
    /// Variables absent from the checkpoint that were allowed to keep their fresh init.
    pub fresh: Vec<String>,
    /// Checkpoint tensors with no matching variable (ignored).
    pub unused: Vec<String>,
}

/// Read every tensor of a `.pth` (zip + pickle state dict, possibly nested under "model" or
/// "state_dict") or a `.safetensors` file, as (state-dict key, CPU tensor), in file order.
pub fn read_checkpoint(path: &Path) -> Result<Vec<(String, Tensor)>, CheckpointError> {
    let io = |source| CheckpointError::Io { path: path.to_path_buf(), source };
    let mut head = [0u8; 16];
    let got = {
        let mut f = File::open(path).map_err(io)?;
        read_up_to(&mut f, &mut head).map_err(io)?
    };
    let head = &head[..got];
    if head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06") {
        read_pth_zip(path)
    } else if looks_like_safetensors(head) {
        read_safetensors(path)
    } else if head.starts_with(&[0x80]) {
        Err(format_err(
            path,
            "legacy (non-zip) torch.save format is not supported; re-save it with torch >= 1.6 \
             (torch.save(torch.load(f), g)) or convert it to safetensors",
        ))
    } else if got == 0 {
        Err(format_err(path, "empty file, not a checkpoint"))
    } else {
        Err(format_err(path, "not a checkpoint (neither a torch .pth zip nor safetensors)"))
    }
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        let k = f.read(&mut buf[n..])?;
        if k == 0 {
            break;
        }
        n += k;
    }
    Ok(n)
}

fn looks_like_safetensors(head: &[u8]) -> bool {
    head.len() >= 9 && head[8] == b'{' && u64::from_le_bytes(head[..8].try_into().unwrap()) < (1 << 32)
}

// ------------------------------------------------------------------------------------------------
// safetensors

fn st_kind(dtype: safetensors::Dtype) -> Option<Kind> {
    use safetensors::Dtype as D;
    Some(match dtype {
        D::F32 => Kind::Float,
        D::F16 => Kind::Half,
        D::BF16 => Kind::BFloat16,
        D::F64 => Kind::Double,
        D::I64 => Kind::Int64,
        D::I32 => Kind::Int,
        D::I16 => Kind::Int16,
        D::I8 => Kind::Int8,
        D::U8 => Kind::Uint8,
        D::BOOL => Kind::Bool,
        _ => return None,
    })
}

/// The libtorch kind and bytes per element of a safetensors header's dtype name ("F16", "BF16", …),
/// for readers that parse headers themselves (the training store's row reader); None if unsupported.
pub fn safetensors_kind(dtype_name: &str) -> Option<(Kind, usize)> {
    let dtype: safetensors::Dtype = serde_json::from_value(serde_json::Value::from(dtype_name)).ok()?;
    Some((st_kind(dtype)?, dtype.size()))
}

/// Read a safetensors file (any of f32/f16/bf16/f64/integer/bool tensors), in file order.
pub fn read_safetensors(path: &Path) -> Result<Vec<(String, Tensor)>, CheckpointError> {
    let len = std::fs::metadata(path).map_err(|source| CheckpointError::Io { path: path.to_path_buf(), source })?.len();
    let cap = crate::limits::get().max_checkpoint_bytes;
    if len > cap {
        return Err(format_err(
            path,
            format!("{len} bytes exceed the limit of {cap} (max_checkpoint_bytes, docs/limits.md)"),
        ));
    }
    let bytes = std::fs::read(path).map_err(|source| CheckpointError::Io { path: path.to_path_buf(), source })?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| format_err(path, format!("invalid safetensors file: {e}")))?;
    let mut named: Vec<(String, safetensors::tensor::TensorView)> = st.tensors();
    // The format keeps no order of its own; report the data layout order.
    named.sort_by_key(|(_, v)| v.data().as_ptr() as usize);
    let mut out = Vec::with_capacity(named.len());
    for (name, view) in named {
        let kind = st_kind(view.dtype())
            .ok_or_else(|| format_err(path, format!("tensor {name}: unsupported dtype {:?}", view.dtype())))?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let t = Tensor::f_from_data_size(view.data(), &shape, kind)
            .map_err(|e| format_err(path, format!("tensor {name}: {e}")))?;
        out.push((name, t));
    }
    Ok(out)
}

struct RawView {
    kind: Kind,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl safetensors::View for &RawView {
    fn dtype(&self) -> safetensors::Dtype {
        match self.kind {
            Kind::Half => safetensors::Dtype::F16,
            Kind::BFloat16 => safetensors::Dtype::BF16,
            _ => safetensors::Dtype::F32,
        }
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Write named tensors as safetensors in `kind` (Float, Half or BFloat16), keeping the names.
pub fn save_safetensors(tensors: &[(String, Tensor)], path: &Path, kind: Kind) -> Result<(), CheckpointError> {
    if !matches!(kind, Kind::Float | Kind::Half | Kind::BFloat16) {
        return Err(format_err(path, format!("cannot write safetensors as {kind:?}: use Float, Half or BFloat16")));
    }
    let mut seen = HashSet::new();
    let mut views = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        if !seen.insert(name.as_str()) {
            return Err(format_err(path, format!("duplicate tensor name {name}")));
        }
        let t = t
            .f_to_device(Device::Cpu)
            .and_then(|t| t.f_to_kind(kind))
            .and_then(|t| t.f_contiguous())
            .map_err(|e| format_err(path, format!("tensor {name}: {e}")))?;
        let numel = t.numel();
        let mut data = vec![0u8; numel * t.kind().elt_size_in_bytes()];
        t.f_copy_data_u8(&mut data, numel).map_err(|e| format_err(path, format!("tensor {name}: {e}")))?;
        let shape = t.size().iter().map(|&d| d as usize).collect();
        views.push((name.clone(), RawView { kind, shape, data }));
    }
    safetensors::serialize_to_file(views.iter().map(|(n, v)| (n.as_str(), v)), &None, path)
        .map_err(|e| format_err(path, format!("cannot write safetensors: {e}")))
}

// ------------------------------------------------------------------------------------------------
// Copying into a VarStore

/// Copy named tensors into `vs` (names = VarStore paths). Every variable must be present with the
/// right shape, except those under one of `fresh_prefixes`, which keep their initialisation.
/// Nothing is copied unless everything checks out.
pub fn load_into(
    vs: &mut nn::VarStore,
    tensors: Vec<(String, Tensor)>,
    fresh_prefixes: &[&str],
) -> Result<LoadReport, CheckpointError> {
    let variables = vs.variables();
    let mut by_name: HashMap<String, Tensor> = HashMap::with_capacity(tensors.len());
    let mut order = Vec::with_capacity(tensors.len());
    for (k, t) in tensors {
        order.push(k.clone());
        by_name.insert(k, t);
    }
    let mut names: Vec<&String> = variables.keys().collect();
    names.sort();
    let mut missing = Vec::new();
    let mut fresh = Vec::new();
    for name in &names {
        let var = &variables[*name];
        match by_name.get(*name) {
            Some(t) if t.size() != var.size() => {
                return Err(CheckpointError::Shape { key: (*name).clone(), expected: var.size(), found: t.size() })
            }
            Some(_) => {}
            None if fresh_prefixes.iter().any(|p| name.starts_with(p)) => fresh.push((*name).clone()),
            None => missing.push((*name).clone()),
        }
    }
    if !missing.is_empty() {
        return Err(CheckpointError::Missing { keys: missing });
    }
    let mut loaded = 0;
    tch::no_grad(|| -> Result<(), CheckpointError> {
        for name in &names {
            if let Some(src) = by_name.get(*name) {
                let mut var = variables[*name].shallow_clone();
                let src = src
                    .f_to_kind(var.kind())
                    .and_then(|s| s.f_to_device(var.device()))
                    .map_err(|e| CheckpointError::Other(format!("{name}: {e}")))?;
                var.f_copy_(&src).map_err(|e| CheckpointError::Other(format!("{name}: {e}")))?;
                loaded += 1;
            }
        }
        Ok(())
    })?;
    let unused = order.into_iter().filter(|k| !variables.contains_key(k)).collect();
    Ok(LoadReport { loaded, fresh, unused })
}

// ------------------------------------------------------------------------------------------------
// torch.save zip archives

fn read_pth_zip(path: &Path) -> Result<Vec<(String, Tensor)>, CheckpointError> {
    let file = File::open(path).map_err(|source| CheckpointError::Io { path: path.to_path_buf(), source })?;
    let mut zip = zip::ZipArchive::new(BufReader::new(file))
        .map_err(|e| format_err(path, format!("corrupt or truncated zip archive: {e}")))?;
    let pkl_name = zip
        .file_names()
        .filter(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
        .min()
        .map(str::to_string)
        .ok_or_else(|| format_err(path, "zip archive has no <folder>/data.pkl: not a torch.save checkpoint"))?;
    let prefix = pkl_name.trim_end_matches("data.pkl").to_string();
    if let Ok(mut f) = zip.by_name(&format!("{prefix}byteorder")) {
        let mut s = String::new();
        let _ = f.read_to_string(&mut s);
        if s.trim() == "big" {
            return Err(format_err(path, "big-endian checkpoints are not supported"));
        }
    }
    let limits = crate::limits::get();
    let mut pickle = Vec::new();
    zip.by_name(&pkl_name)
        .and_then(|f| f.take(limits.max_pickle_bytes + 1).read_to_end(&mut pickle).map_err(Into::into))
        .map_err(|e| format_err(path, format!("cannot read {pkl_name}: {e}")))?;
    if pickle.len() as u64 > limits.max_pickle_bytes {
        return Err(format_err(
            path,
            format!("{pkl_name} is larger than {} bytes (max_pickle_bytes, docs/limits.md)", limits.max_pickle_bytes),
        ));
    }
    let file_len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let mut budget = limits.max_checkpoint_bytes.min(file_len.saturating_mul(limits.max_zip_ratio));
    let root = Unpickler::new(&pickle).run().map_err(|e| format_err(path, format!("{pkl_name}: {e}")))?;
    let entries = state_dict_entries(&root)
        .ok_or_else(|| format_err(path, "the pickled object is not a dict of tensors (no state dict found)"))?;
    let mut storages: HashMap<String, Tensor> = HashMap::new();
    let mut out = Vec::with_capacity(entries.len());
    for (key, spec) in entries {
        let storage = match storages.get(&spec.storage.key) {
            Some(s) => s.shallow_clone(),
            None => {
                let s = read_storage(&mut zip, &prefix, &spec.storage, &mut budget)
                    .map_err(|p| format_err(path, format!("tensor {key}: {p}")))?;
                storages.insert(spec.storage.key.clone(), s.shallow_clone());
                s
            }
        };
        let t = spec.build(&storage).map_err(|p| format_err(path, format!("tensor {key}: {p}")))?;
        out.push((key, t));
    }
    Ok(out)
}

fn read_storage<R: Read + std::io::Seek>(
    zip: &mut zip::ZipArchive<R>,
    prefix: &str,
    s: &StorageRef,
    budget: &mut u64,
) -> Result<Tensor, String> {
    let name = format!("{prefix}data/{}", s.key);
    let mut f = zip.by_name(&name).map_err(|e| format!("storage {name}: {e}"))?;
    let elt = s.kind.elt_size_in_bytes();
    let nbytes = s.numel.checked_mul(elt).ok_or("storage size overflows")?;
    if f.size() < nbytes as u64 {
        return Err(format!("storage {name} holds {} bytes, {} expected", f.size(), nbytes));
    }
    // Checked before allocating: the whole checkpoint's decoded bytes stay within max_checkpoint_bytes
    // and within max_zip_ratio × the file's size (a zip bomb declares far more than it stores).
    if nbytes as u64 > *budget
        || (nbytes as u64) > f.compressed_size().saturating_mul(crate::limits::get().max_zip_ratio)
    {
        return Err(format!(
            "storage {name} decodes to {nbytes} bytes, beyond the checkpoint limits (max_checkpoint_bytes, max_zip_ratio, docs/limits.md)"
        ));
    }
    *budget -= nbytes as u64;
    let t = Tensor::f_empty([s.numel as i64], (s.kind, Device::Cpu)).map_err(|e| e.to_string())?;
    if nbytes > 0 {
        // SAFETY: `t` is a fresh contiguous CPU tensor of exactly `nbytes` bytes that nothing else sees.
        let buf = unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut u8, nbytes) };
        f.read_exact(buf).map_err(|e| format!("storage {name}: {e}"))?;
    }
    Ok(t)
}

/// The state dict inside an unpickled checkpoint: the top-level dict, or the one under "model" /
/// "state_dict" when present. Non-tensor values are skipped.
fn state_dict_entries(root: &Value) -> Option<Vec<(String, Rc<TensorSpec>)>> {
    state_dict_entries_at(root, 0)
}

/// Wrappers are looked into at most 4 levels deep: a dict that contains itself stops here.
fn state_dict_entries_at(root: &Value, depth: usize) -> Option<Vec<(String, Rc<TensorSpec>)>> {
    let Value::Dict(d) = root else { return None };
    let d = d.try_borrow().ok()?;
    for wrapper in ["state_dict", "model"] {
        if depth >= 4 {
            break;
        }
        if let Some((_, inner @ Value::Dict(_))) = d.iter().find(|(k, _)| k.as_str() == Some(wrapper)) {
            if let Some(found) = state_dict_entries_at(inner, depth + 1) {
                return Some(found);
            }
        }
    }
    let entries: Vec<_> = d
        .iter()
        .filter_map(|(k, v)| match (k, v) {
            (Value::Str(k), Value::Tensor(t)) => Some((k.clone(), t.clone())),
            _ => None,
        })
        .collect();
    (!entries.is_empty()).then_some(entries)
}

#[derive(Debug)]
struct StorageRef {
    kind: Kind,
    key: String,
    numel: usize,
}

#[derive(Debug)]
struct TensorSpec {
    storage: Rc<StorageRef>,
    offset: i64,
    size: Vec<i64>,
    stride: Vec<i64>,
}

impl TensorSpec {
    fn build(&self, storage: &Tensor) -> Result<Tensor, String> {
        if self.size.len() != self.stride.len() {
            return Err(format!("size {:?} and stride {:?} differ in rank", self.size, self.stride));
        }
        if self.offset < 0 || self.size.iter().any(|&d| d < 0) || self.stride.iter().any(|&d| d < 0) {
            return Err("negative size, stride or offset".into());
        }
        if self.size.iter().all(|&d| d > 0) {
            let mut last = self.offset as i128;
            for (d, s) in self.size.iter().zip(&self.stride) {
                last += (*d as i128 - 1) * *s as i128;
            }
            if last >= self.storage.numel as i128 {
                return Err(format!(
                    "view (offset {}, size {:?}, stride {:?}) reads past its storage of {} elements",
                    self.offset, self.size, self.stride, self.storage.numel
                ));
            }
        }
        storage
            .f_as_strided(self.size.as_slice(), self.stride.as_slice(), self.offset)
            .and_then(|t| t.f_contiguous())
            .map_err(|e| e.to_string())
    }
}

// ------------------------------------------------------------------------------------------------
// The pickle subset torch.save writes (protocol 2, plus the few protocol 3/4 opcodes that are
// harmless). Globals are never imported: only torch's tensor rebuilders and OrderedDict mean
// anything; any other call yields an opaque value.

#[allow(dead_code)] // payloads kept for debugging output
#[derive(Debug, Clone)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Rc<Vec<u8>>),
    Tuple(Rc<Vec<Value>>),
    List(Rc<RefCell<Vec<Value>>>),
    Dict(Rc<RefCell<Vec<(Value, Value)>>>),
    Global(Rc<(String, String)>),
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorSpec>),
    /// The result of calling something we do not model.
    Opaque,
}

impl Value {
    fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Bool(b) => Some(*b as i64),
            _ => None,
        }
    }
    fn int_list(&self) -> Option<Vec<i64>> {
        match self {
            Value::Tuple(t) => t.iter().map(Value::as_int).collect(),
            Value::List(l) => l.borrow().iter().map(Value::as_int).collect(),
            _ => None,
        }
    }
    fn new_dict() -> Value {
        Value::Dict(Rc::new(RefCell::new(Vec::new())))
    }
}

fn storage_kind(name: &str) -> Option<Kind> {
    Some(match name {
        "FloatStorage" => Kind::Float,
        "DoubleStorage" => Kind::Double,
        "HalfStorage" => Kind::Half,
        "BFloat16Storage" => Kind::BFloat16,
        "LongStorage" => Kind::Int64,
        "IntStorage" => Kind::Int,
        "ShortStorage" => Kind::Int16,
        "CharStorage" => Kind::Int8,
        "ByteStorage" | "UntypedStorage" => Kind::Uint8,
        "BoolStorage" => Kind::Bool,
        _ => return None,
    })
}

/// Values a pickle may push in all: a SAM ViT-H state dict needs about 10⁴; the cap bounds memory
/// whatever the file's nesting, memo reuse or self-references.
const MAX_PUSHES: usize = 2_000_000;

impl Drop for Value {
    /// Iterative, so that a pickle nested a million levels deep cannot overflow the stack when its
    /// values are freed (recursion would abort the process, which no panic boundary can stop).
    fn drop(&mut self) {
        let mut pending: Vec<Value> = Vec::new();
        detach_children(self, &mut pending);
        while let Some(mut v) = pending.pop() {
            detach_children(&mut v, &mut pending);
        }
    }
}

/// Moves the children of a container this value owns alone into `out` (shared ones stay).
fn detach_children(v: &mut Value, out: &mut Vec<Value>) {
    match v {
        Value::Tuple(rc) => {
            if let Some(items) = Rc::get_mut(rc) {
                out.append(items);
            }
        }
        Value::List(rc) if Rc::strong_count(rc) == 1 => {
            if let Ok(mut items) = rc.try_borrow_mut() {
                out.append(&mut items);
            }
        }
        Value::Dict(rc) if Rc::strong_count(rc) == 1 => {
            if let Ok(mut items) = rc.try_borrow_mut() {
                for (k, x) in items.drain(..) {
                    out.push(k);
                    out.push(x);
                }
            }
        }
        _ => {}
    }
}

struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    pushes: usize,
}

type PResult<T> = Result<T, String>;

impl<'a> Unpickler<'a> {
    fn new(data: &'a [u8]) -> Self {
        Unpickler { data, pos: 0, stack: Vec::new(), marks: Vec::new(), memo: HashMap::new(), pushes: 0 }
    }

    fn take(&mut self, n: usize) -> PResult<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len()).ok_or("pickle ends early (truncated)")?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> PResult<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> PResult<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> PResult<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> PResult<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn line(&mut self) -> PResult<String> {
        let rest = &self.data[self.pos..];
        let n = rest.iter().position(|&b| b == b'\n').ok_or("pickle ends early (truncated)")?;
        let s = std::str::from_utf8(&rest[..n]).map_err(|_| "GLOBAL name is not UTF-8")?.to_string();
        self.pos += n + 1;
        Ok(s)
    }
    fn string(&mut self, n: usize) -> PResult<Value> {
        let b = self.take(n)?;
        Ok(Value::Str(std::str::from_utf8(b).map_err(|_| "string is not UTF-8")?.to_string()))
    }
    fn pop(&mut self) -> PResult<Value> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return Err("pickle stack underflow (popped past a MARK)".into());
        }
        self.stack.pop().ok_or_else(|| "pickle stack underflow".into())
    }
    fn top(&mut self) -> PResult<&mut Value> {
        self.stack.last_mut().ok_or_else(|| "pickle stack underflow".into())
    }
    fn pop_mark(&mut self) -> PResult<Vec<Value>> {
        let m = self.marks.pop().ok_or("pickle pops a MARK that was never set")?;
        if m > self.stack.len() {
            return Err("pickle stack underflow".into());
        }
        Ok(self.stack.split_off(m))
    }
    fn push(&mut self, v: Value) -> PResult<()> {
        self.pushes += 1;
        if self.pushes > MAX_PUSHES {
            return Err(format!("the pickle builds more than {MAX_PUSHES} values: not a state dict"));
        }
        self.stack.push(v);
        Ok(())
    }

    fn run(mut self) -> PResult<Value> {
        loop {
            let at = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    let p = self.u8()?;
                    if p > 5 {
                        return Err(format!("unsupported pickle protocol {p}"));
                    }
                }
                0x95 => {
                    self.u64()?; // FRAME: a length hint only
                }
                b'.' => return self.stack.pop().ok_or_else(|| "STOP with an empty stack".into()),
                b'}' => self.push(Value::new_dict())?,
                b']' => self.push(Value::List(Rc::new(RefCell::new(Vec::new()))))?,
                b')' => self.push(Value::Tuple(Rc::new(Vec::new())))?,
                b'(' => self.marks.push(self.stack.len()),
                b'N' => self.push(Value::None)?,
                0x88 => self.push(Value::Bool(true))?,
                0x89 => self.push(Value::Bool(false))?,
                b'J' => {
                    let v = self.u32()? as i32 as i64;
                    self.push(Value::Int(v))?
                }
                b'K' => {
                    let v = self.u8()? as i64;
                    self.push(Value::Int(v))?
                }
                b'M' => {
                    let v = self.u16()? as i64;
                    self.push(Value::Int(v))?
                }
                0x8a | 0x8b => {
                    let n = if op == 0x8a { self.u8()? as usize } else { self.u32()? as usize };
                    let b = self.take(n)?;
                    if n > 8 {
                        return Err(format!("integer of {n} bytes does not fit 64 bits"));
                    }
                    let mut v: i64 = 0;
                    for (i, &byte) in b.iter().enumerate() {
                        v |= (byte as i64) << (8 * i);
                    }
                    if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                        v -= 1i64 << (8 * n);
                    }
                    self.push(Value::Int(v))?
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.take(8)?.try_into().unwrap());
                    self.push(Value::Float(v))?
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let s = self.string(n)?;
                    self.push(s)?
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let s = self.string(n)?;
                    self.push(s)?
                }
                0x8d => {
                    let n = self.u64()? as usize;
                    let s = self.string(n)?;
                    self.push(s)?
                }
                b'T' | b'U' => {
                    let n = if op == b'T' { self.u32()? as usize } else { self.u8()? as usize };
                    let b = self.take(n)?;
                    self.push(Value::Str(String::from_utf8_lossy(b).into_owned()))?
                }
                b'B' | b'C' | 0x8e => {
                    let n = match op {
                        b'B' => self.u32()? as usize,
                        b'C' => self.u8()? as usize,
                        _ => self.u64()? as usize,
                    };
                    let b = self.take(n)?.to_vec();
                    self.push(Value::Bytes(Rc::new(b)))?
                }
                b'q' => {
                    let i = self.u8()? as u32;
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                b'r' => {
                    let i = self.u32()?;
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                0x94 => {
                    let i = self.memo.len() as u32;
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                b'h' | b'j' => {
                    let i = if op == b'h' { self.u8()? as u32 } else { self.u32()? };
                    let v = self
                        .memo
                        .get(&i)
                        .cloned()
                        .ok_or_else(|| format!("memo entry {i} read before it was written"))?;
                    self.push(v)?
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.push(Value::Global(Rc::new((module, name))))?
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (&module, &name) {
                        (Value::Str(m), Value::Str(n)) => self.push(Value::Global(Rc::new((m.clone(), n.clone()))))?,
                        _ => return Err("STACK_GLOBAL needs two strings".into()),
                    }
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Value::Tuple(Rc::new(items)))?
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.push(Value::Tuple(Rc::new(items)))?
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push(Value::List(Rc::new(RefCell::new(items))))?
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    let d = Value::new_dict();
                    set_items(&d, items)?;
                    self.push(d)?
                }
                b'a' => {
                    let v = self.pop()?;
                    match self.top()? {
                        Value::List(l) => l.borrow_mut().push(v),
                        _ => return Err(format!("APPEND to a non-list at byte {at}")),
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    match self.top()? {
                        Value::List(l) => l.borrow_mut().extend(items),
                        _ => return Err(format!("APPENDS to a non-list at byte {at}")),
                    }
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    let d = self.top()?.clone();
                    set_items(&d, vec![k, v])?
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let d = self.top()?.clone();
                    set_items(&d, items)?
                }
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.push(v)?
                }
                b'b' => {
                    // BUILD: object state (e.g. a state dict's `_metadata`); not needed.
                    self.pop()?;
                    self.top()?;
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = persistent_load(&pid)?;
                    self.push(v)?
                }
                b'R' => {
                    let args = self.pop()?;
                    let func = self.pop()?;
                    let v = reduce(&func, &args)?;
                    self.push(v)?
                }
                0x81 => {
                    let _args = self.pop()?;
                    let _cls = self.pop()?;
                    self.push(Value::Opaque)?
                }
                _ => return Err(format!("unsupported pickle opcode 0x{op:02x} at byte {at}")),
            }
        }
    }
}

fn set_items(d: &Value, items: Vec<Value>) -> PResult<()> {
    let Value::Dict(d) = d else { return Err("SETITEM(S) on a non-dict".into()) };
    if items.len() % 2 != 0 {
        return Err("SETITEMS with an odd number of items".into());
    }
    let mut d = d.borrow_mut();
    let mut it = items.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        if let Some(slot) = d.iter_mut().find(|(old, _)| same_key(old, &k)) {
            slot.1 = v;
        } else {
            d.push((k, v));
        }
    }
    Ok(())
}

fn same_key(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Str(x), Value::Str(y)) => x == y,
        (Value::Int(x), Value::Int(y)) => x == y,
        _ => false,
    }
}

/// torch.save's persistent id: ('storage', <torch.XStorage>, key, location, numel).
fn persistent_load(pid: &Value) -> PResult<Value> {
    let Value::Tuple(t) = pid else { return Err("persistent id is not a tuple".into()) };
    if t.len() < 5 || t[0].as_str() != Some("storage") {
        return Err("persistent id is not a ('storage', ...) tuple".into());
    }
    let Value::Global(g) = &t[1] else { return Err("persistent id has no storage type".into()) };
    let kind = storage_kind(&g.1).ok_or_else(|| format!("unsupported storage type {}.{}", g.0, g.1))?;
    let key = match &t[2] {
        Value::Str(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        _ => return Err("storage key is not a string".into()),
    };
    if key.is_empty() || key.contains('/') || key.contains("..") {
        return Err(format!("invalid storage key {key:?}"));
    }
    let numel = t[4].as_int().filter(|&n| n >= 0).ok_or("storage size is not a non-negative integer")? as usize;
    Ok(Value::Storage(Rc::new(StorageRef { kind, key, numel })))
}

fn reduce(func: &Value, args: &Value) -> PResult<Value> {
    let Value::Global(g) = func else { return Ok(Value::Opaque) };
    let args: &[Value] = match args {
        Value::Tuple(t) => t,
        _ => return Err(format!("REDUCE of {}.{} without an argument tuple", g.0, g.1)),
    };
    match (g.0.as_str(), g.1.as_str()) {
        ("collections", "OrderedDict") | ("builtins", "dict") | ("__builtin__", "dict") => Ok(Value::new_dict()),
        ("torch._utils", "_rebuild_tensor_v2") | ("torch._utils", "_rebuild_tensor") => {
            if args.len() < 4 {
                return Err("_rebuild_tensor_v2 with too few arguments".into());
            }
            let Value::Storage(storage) = &args[0] else {
                return Err("_rebuild_tensor_v2 without a storage".into());
            };
            let offset = args[1].as_int().ok_or("tensor offset is not an integer")?;
            let size = args[2].int_list().ok_or("tensor size is not a tuple of integers")?;
            let stride = args[3].int_list().ok_or("tensor stride is not a tuple of integers")?;
            Ok(Value::Tensor(Rc::new(TensorSpec { storage: storage.clone(), offset, size, stride })))
        }
        ("torch._utils", "_rebuild_parameter") | ("torch._utils", "_rebuild_parameter_with_state") => {
            Ok(args.first().cloned().unwrap_or(Value::Opaque))
        }
        _ => Ok(Value::Opaque),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long1_decodes_negative_and_positive() {
        // PROTO 2, LONG1 2 bytes 0xff 0x7f (=32767), STOP
        let v = Unpickler::new(&[0x80, 2, 0x8a, 2, 0xff, 0x7f, b'.']).run().unwrap();
        assert_eq!(v.as_int(), Some(32767));
        let v = Unpickler::new(&[0x80, 2, 0x8a, 1, 0xff, b'.']).run().unwrap();
        assert_eq!(v.as_int(), Some(-1));
    }

    #[test]
    fn unknown_opcode_and_truncation_are_errors() {
        assert!(Unpickler::new(&[0x80, 2, 0xff]).run().unwrap_err().contains("opcode 0xff"));
        assert!(Unpickler::new(&[0x80, 2, b'X', 10, 0, 0, 0, b'a']).run().unwrap_err().contains("truncated"));
        assert!(Unpickler::new(b"u").run().is_err());
    }

    #[test]
    fn setitems_builds_an_ordered_dict() {
        // }( X'a' K1 X'b' K2 u .
        let mut p = vec![0x80, 2, b'}', b'('];
        for (k, v) in [("b", 1u8), ("a", 2u8)] {
            p.extend([0x8c, 1, k.as_bytes()[0], b'K', v]);
        }
        p.extend([b'u', b'.']);
        let root = Unpickler::new(&p).run().unwrap();
        let Value::Dict(d) = &root else { panic!("not a dict") };
        let keys: Vec<_> = d.borrow().iter().map(|(k, _)| k.as_str().unwrap().to_string()).collect();
        assert_eq!(keys, ["b", "a"]);
    }
}
