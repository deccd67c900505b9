//! A restricted pickle interpreter for `torch.save`d state dicts.
//!
//! In Python a pickle is a program: `GLOBAL` + `REDUCE` can call any importable function. This
//! interpreter only knows the handful of callables a state dict is made of (`OrderedDict`,
//! `torch._utils._rebuild_tensor_v2`, `_rebuild_parameter`, the storage types) and refuses every
//! other global by name. Nothing is ever executed: "calling" one of the known globals builds a
//! plain description of a tensor (storage key, dtype, offset, size, stride) whose bytes the caller
//! finds in the zip archive.
//!
//! Containers are reference counted, so memo references (`BINGET`) share instead of deep-copying:
//! a malicious pickle cannot blow up memory by duplicating a large list again and again.

use std::collections::HashMap;
use std::rc::Rc;

use candle_core::DType;

/// A storage type tag (`torch.BFloat16Storage`, `torch.bfloat16`, ...) and the dtype candle uses
/// for it, `None` when candle cannot hold it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StorageType {
    pub name: String,
    pub dtype: Option<DType>,
}

/// The only globals a pickle may name.
#[derive(Debug, Clone, PartialEq)]
enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildParameter,
    Storage(StorageType),
}

/// `persistent_id` of a storage: `('storage', type, key, location, numel)`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StorageRef {
    pub ty: StorageType,
    pub key: String,
    pub numel: u64,
}

/// `_rebuild_tensor_v2(storage, storage_offset, size, stride, ...)`, all in elements.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TensorRef {
    pub storage: StorageRef,
    pub offset: u64,
    pub size: Vec<u64>,
    pub stride: Vec<u64>,
}

/// Deepest container nesting accepted. A state dict nests 3 levels (dict, argument tuple, size
/// tuple); a pickle can nest one level per byte, and dropping a million nested containers
/// overflows the stack, so deeper nesting is refused while it is built.
const MAX_DEPTH: u32 = 256;

/// The items of a tuple, list or dict, with the nesting depth of the container (1 for one holding
/// no container).
#[derive(Debug, Clone)]
struct Seq<T> {
    items: Vec<T>,
    depth: u32,
}

impl<T> Default for Seq<T> {
    fn default() -> Self {
        Self {
            items: Vec::new(),
            depth: 1,
        }
    }
}

impl<T> std::ops::Deref for Seq<T> {
    type Target = Vec<T>;
    fn deref(&self) -> &Vec<T> {
        &self.items
    }
}

fn nested(depth: u32) -> Result<u32, String> {
    if depth >= MAX_DEPTH {
        return Err(format!(
            "pickle containers nested deeper than {MAX_DEPTH} levels (not a state dict)"
        ));
    }
    Ok(depth + 1)
}

impl Seq<Value> {
    fn of(items: Vec<Value>) -> Result<Rc<Self>, String> {
        let depth = nested(items.iter().map(Value::depth).max().unwrap_or(0))?;
        Ok(Rc::new(Self { items, depth }))
    }
    fn extend(&mut self, items: Vec<Value>) -> Result<(), String> {
        for v in &items {
            self.depth = self.depth.max(nested(v.depth())?);
        }
        self.items.extend(items);
        Ok(())
    }
}

impl Seq<(Value, Value)> {
    fn push(&mut self, k: Value, v: Value) -> Result<(), String> {
        self.depth = self.depth.max(nested(k.depth().max(v.depth()))?);
        self.items.push((k, v));
        Ok(())
    }
}

#[derive(Debug, Clone)]
enum Value {
    None,
    /// Only tested for presence (e.g. `requires_grad`), so the value is not kept.
    Bool,
    Int(i64),
    Float,
    Str(Rc<str>),
    Tuple(Rc<Seq<Value>>),
    List(Rc<Seq<Value>>),
    Dict(Rc<Seq<(Value, Value)>>),
    Global(Global),
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorRef>),
}

impl Value {
    /// Container nesting depth (0 for a scalar).
    fn depth(&self) -> u32 {
        match self {
            Value::Tuple(s) | Value::List(s) => s.depth,
            Value::Dict(s) => s.depth,
            _ => 0,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool => "bool",
            Value::Int(_) => "int",
            Value::Float => "float",
            Value::Str(_) => "str",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict(_) => "dict",
            Value::Global(_) => "global",
            Value::Storage(_) => "storage",
            Value::Tensor(_) => "tensor",
        }
    }
}

/// Maps an allowed `module.name` to its meaning, `None` for everything else.
fn resolve_global(module: &str, name: &str) -> Option<Global> {
    let storage = |dtype| {
        Some(Global::Storage(StorageType {
            name: name.to_string(),
            dtype,
        }))
    };
    match (module, name) {
        ("collections", "OrderedDict") => Some(Global::OrderedDict),
        ("torch._utils", "_rebuild_tensor_v2") => Some(Global::RebuildTensorV2),
        ("torch._utils", "_rebuild_parameter") => Some(Global::RebuildParameter),
        ("torch", "DoubleStorage" | "float64" | "double") => storage(Some(DType::F64)),
        ("torch", "FloatStorage" | "float32" | "float") => storage(Some(DType::F32)),
        ("torch", "HalfStorage" | "float16" | "half") => storage(Some(DType::F16)),
        ("torch", "BFloat16Storage" | "bfloat16") => storage(Some(DType::BF16)),
        ("torch", "LongStorage" | "int64" | "long") => storage(Some(DType::I64)),
        ("torch", "IntStorage" | "int32" | "int") => storage(Some(DType::I32)),
        ("torch", "ShortStorage" | "int16" | "short") => storage(Some(DType::I16)),
        ("torch", "ByteStorage" | "uint8") => storage(Some(DType::U8)),
        // Known storage types without a candle dtype: refused per tensor, with its name.
        ("torch", "CharStorage" | "int8" | "BoolStorage" | "bool" | "ComplexFloatStorage")
        | ("torch", "ComplexDoubleStorage" | "QInt8Storage" | "QUInt8Storage") => storage(None),
        _ => None,
    }
}

/// Runs the pickle `data` and returns the top-level dict's `(name, tensor)` entries; entries whose
/// value is not a tensor are skipped. Errors are plain messages; the caller adds the path.
pub(crate) fn load_state_dict(data: &[u8]) -> Result<Vec<(String, TensorRef)>, String> {
    let top = Machine::new(data).run()?;
    let Value::Dict(items) = top else {
        return Err(format!(
            "the pickle holds a {}, not a state dict",
            top.kind()
        ));
    };
    let mut out = Vec::with_capacity(items.len());
    // Only the top level is walked: a DAG of shared containers is never traversed.
    for (k, v) in items.iter() {
        if let (Value::Str(name), Value::Tensor(t)) = (k, v) {
            out.push((name.to_string(), TensorRef::clone(t)));
        }
    }
    Ok(out)
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    /// Stack lengths at each MARK.
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
}

impl<'a> Machine<'a> {
    fn new(data: &'a [u8]) -> Self {
        Self {
            data,
            pos: 0,
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let data: &'a [u8] = self.data;
        let bytes = self
            .pos
            .checked_add(n)
            .and_then(|end| data.get(self.pos..end))
            .ok_or_else(|| format!("pickle truncated: {n} bytes needed at byte {}", self.pos))?;
        self.pos += n;
        Ok(bytes)
    }

    fn byte(&mut self) -> Result<u8, String> {
        let [b] = self.array::<1>()?;
        Ok(b)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        self.take(N)?
            .try_into()
            .map_err(|_| "pickle: internal length error".to_string())
    }

    /// A `\n`-terminated line (GLOBAL arguments).
    fn line(&mut self) -> Result<&'a str, String> {
        let data: &'a [u8] = self.data;
        let rest = data.get(self.pos..).unwrap_or_default();
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| "pickle truncated inside GLOBAL".to_string())?;
        let line = rest.get(..n).unwrap_or_default();
        self.pos += n + 1;
        std::str::from_utf8(line).map_err(|_| "GLOBAL name is not UTF-8".to_string())
    }

    fn string(&mut self, n: usize) -> Result<Value, String> {
        let bytes = self.take(n)?;
        let s = std::str::from_utf8(bytes).map_err(|_| "string is not UTF-8".to_string())?;
        Ok(Value::Str(s.into()))
    }

    fn pop(&mut self) -> Result<Value, String> {
        self.stack
            .pop()
            .ok_or_else(|| "pickle stack underflow".to_string())
    }

    fn top(&mut self) -> Result<&mut Value, String> {
        self.stack
            .last_mut()
            .ok_or_else(|| "pickle stack underflow".to_string())
    }

    /// Pops everything above the last MARK.
    fn pop_mark(&mut self) -> Result<Vec<Value>, String> {
        let m = self
            .marks
            .pop()
            .ok_or_else(|| "pickle: no MARK on the stack".to_string())?;
        if m > self.stack.len() {
            return Err("pickle: MARK above the stack top".to_string());
        }
        Ok(self.stack.split_off(m))
    }

    fn memo_get(&self, idx: u32) -> Result<Value, String> {
        self.memo
            .get(&idx)
            .cloned()
            .ok_or_else(|| format!("pickle: memo entry {idx} missing"))
    }

    fn memo_put(&mut self, idx: u32) -> Result<(), String> {
        let v = self
            .stack
            .last()
            .cloned()
            .ok_or_else(|| "pickle stack underflow".to_string())?;
        self.memo.insert(idx, v);
        Ok(())
    }

    fn global(module: &str, name: &str) -> Result<Value, String> {
        resolve_global(module, name)
            .map(Value::Global)
            .ok_or_else(|| {
                format!(
                    "refusing pickle global `{module}.{name}`: only the torch tensor storage globals are allowed (a pickle must not construct arbitrary objects)"
                )
            })
    }

    fn set_items(&mut self, pairs: Vec<Value>) -> Result<(), String> {
        let Value::Dict(dict) = self.top()? else {
            return Err("pickle: SETITEMS on a non-dict".to_string());
        };
        let dict = Rc::make_mut(dict);
        let mut it = pairs.into_iter();
        // Duplicate keys stay in order; the caller lets the last one win, like Python.
        while let Some(k) = it.next() {
            let v = it
                .next()
                .ok_or_else(|| "pickle: odd number of items for SETITEMS".to_string())?;
            dict.push(k, v)?;
        }
        Ok(())
    }

    fn append(&mut self, items: Vec<Value>) -> Result<(), String> {
        match self.top()? {
            Value::List(list) => Rc::make_mut(list).extend(items),
            other => Err(format!("pickle: APPEND to a {}", other.kind())),
        }
    }

    fn run(mut self) -> Result<Value, String> {
        loop {
            let at = self.pos;
            let op = self.byte()?;
            self.step(op)
                .map_err(|e| format!("{e} (opcode 0x{op:02x} at byte {at} of the pickle)"))?;
            if op == b'.' {
                return self.pop();
            }
        }
    }

    fn step(&mut self, op: u8) -> Result<(), String> {
        match op {
            // PROTO
            0x80 => {
                let v = self.byte()?;
                if v > 5 {
                    return Err(format!("unsupported pickle protocol {v}"));
                }
            }
            // FRAME (protocol 4): only a length hint.
            0x95 => {
                self.take(8)?;
            }
            b'.' => {} // STOP, handled by `run`
            b'(' => self.marks.push(self.stack.len()),
            b'}' => self.stack.push(Value::Dict(Rc::default())),
            b']' => self.stack.push(Value::List(Rc::default())),
            b')' => self.stack.push(Value::Tuple(Rc::default())),
            b'N' => self.stack.push(Value::None),
            0x88 | 0x89 => self.stack.push(Value::Bool), // NEWTRUE, NEWFALSE
            // BININT, BININT1, BININT2, LONG1
            b'J' => {
                let v = i32::from_le_bytes(self.array()?);
                self.stack.push(Value::Int(i64::from(v)));
            }
            b'K' => {
                let v = self.byte()?;
                self.stack.push(Value::Int(i64::from(v)));
            }
            b'M' => {
                let v = u16::from_le_bytes(self.array()?);
                self.stack.push(Value::Int(i64::from(v)));
            }
            0x8a => {
                let n = usize::from(self.byte()?);
                if n > 8 {
                    return Err(format!("LONG1 of {n} bytes does not fit in 64 bits"));
                }
                let bytes = self.take(n)?;
                let mut buf = [0u8; 8];
                buf[..n].copy_from_slice(bytes);
                // Sign-extend two's complement.
                if n < 8 && bytes.last().is_some_and(|b| b & 0x80 != 0) {
                    buf[n..].fill(0xff);
                }
                self.stack.push(Value::Int(i64::from_le_bytes(buf)));
            }
            // BINFLOAT: big-endian f64
            b'G' => {
                self.take(8)?;
                self.stack.push(Value::Float);
            }
            // BINUNICODE, SHORT_BINUNICODE, BINUNICODE8, and the protocol <= 2 byte strings
            b'X' => {
                let n = u32::from_le_bytes(self.array()?) as usize;
                let v = self.string(n)?;
                self.stack.push(v);
            }
            0x8c | b'U' => {
                let n = usize::from(self.byte()?);
                let v = self.string(n)?;
                self.stack.push(v);
            }
            0x8d => {
                let n = u64::from_le_bytes(self.array()?);
                let n = usize::try_from(n).map_err(|_| "string too long".to_string())?;
                let v = self.string(n)?;
                self.stack.push(v);
            }
            b'T' => {
                let n = u32::from_le_bytes(self.array()?) as usize;
                let v = self.string(n)?;
                self.stack.push(v);
            }
            // BINPUT, LONG_BINPUT, MEMOIZE
            b'q' => {
                let idx = u32::from(self.byte()?);
                self.memo_put(idx)?;
            }
            b'r' => {
                let idx = u32::from_le_bytes(self.array()?);
                self.memo_put(idx)?;
            }
            0x94 => {
                let idx =
                    u32::try_from(self.memo.len()).map_err(|_| "memo too large".to_string())?;
                self.memo_put(idx)?;
            }
            // BINGET, LONG_BINGET
            b'h' => {
                let idx = u32::from(self.byte()?);
                let v = self.memo_get(idx)?;
                self.stack.push(v);
            }
            b'j' => {
                let idx = u32::from_le_bytes(self.array()?);
                let v = self.memo_get(idx)?;
                self.stack.push(v);
            }
            // GLOBAL, STACK_GLOBAL
            b'c' => {
                let module = self.line()?;
                let name = self.line()?;
                self.stack.push(Self::global(module, name)?);
            }
            0x93 => {
                let name = self.pop()?;
                let module = self.pop()?;
                let (Value::Str(module), Value::Str(name)) = (module, name) else {
                    return Err("STACK_GLOBAL needs two strings".to_string());
                };
                self.stack.push(Self::global(&module, &name)?);
            }
            // TUPLE, TUPLE1..3
            b't' => {
                let items = self.pop_mark()?;
                self.stack.push(Value::Tuple(Seq::of(items)?));
            }
            0x85..=0x87 => {
                let n = usize::from(op - 0x84);
                if self.stack.len() < n {
                    return Err("pickle stack underflow".to_string());
                }
                let items = self.stack.split_off(self.stack.len() - n);
                self.stack.push(Value::Tuple(Seq::of(items)?));
            }
            // LIST, DICT (from MARK)
            b'l' => {
                let items = self.pop_mark()?;
                self.stack.push(Value::List(Seq::of(items)?));
            }
            b'd' => {
                let items = self.pop_mark()?;
                self.stack.push(Value::Dict(Rc::default()));
                self.set_items(items)?;
            }
            // SETITEM, SETITEMS
            b's' => {
                let v = self.pop()?;
                let k = self.pop()?;
                self.set_items(vec![k, v])?;
            }
            b'u' => {
                let items = self.pop_mark()?;
                self.set_items(items)?;
            }
            // APPEND, APPENDS
            b'a' => {
                let v = self.pop()?;
                self.append(vec![v])?;
            }
            b'e' => {
                let items = self.pop_mark()?;
                self.append(items)?;
            }
            // POP, POP_MARK, DUP
            b'0' => {
                self.pop()?;
            }
            b'1' => {
                self.pop_mark()?;
            }
            b'2' => {
                let v = self.top()?.clone();
                self.stack.push(v);
            }
            // BINPERSID: a storage reference.
            b'Q' => {
                let pid = self.pop()?;
                let v = persistent_load(pid)?;
                self.stack.push(v);
            }
            // REDUCE: "call" one of the allowed globals.
            b'R' => {
                let args = self.pop()?;
                let callable = self.pop()?;
                let v = reduce(callable, args)?;
                self.stack.push(v);
            }
            // BUILD: object state (`_metadata` of an OrderedDict, tensor attributes); not needed.
            b'b' => {
                self.pop()?;
                self.top()?;
            }
            _ => return Err(format!("unsupported pickle opcode 0x{op:02x}")),
        }
        Ok(())
    }
}

fn int(v: &Value, what: &str) -> Result<u64, String> {
    match v {
        Value::Int(i) => u64::try_from(*i).map_err(|_| format!("negative {what} {i}")),
        other => Err(format!("{what} is a {}, expected an int", other.kind())),
    }
}

fn ints(v: &Value, what: &str) -> Result<Vec<u64>, String> {
    match v {
        Value::Tuple(items) | Value::List(items) => items.iter().map(|i| int(i, what)).collect(),
        other => Err(format!("{what} is a {}, expected a tuple", other.kind())),
    }
}

fn persistent_load(pid: Value) -> Result<Value, String> {
    let Value::Tuple(t) = pid else {
        return Err(format!(
            "persistent id is a {}, expected a tuple",
            pid.kind()
        ));
    };
    match t.as_slice() {
        [Value::Str(tag), Value::Global(Global::Storage(ty)), Value::Str(key), _location, numel]
            if &**tag == "storage" =>
        {
            Ok(Value::Storage(Rc::new(StorageRef {
                ty: ty.clone(),
                key: key.to_string(),
                numel: int(numel, "storage size")?,
            })))
        }
        _ => Err(
            "unsupported persistent id (expected ('storage', type, key, location, size))"
                .to_string(),
        ),
    }
}

fn reduce(callable: Value, args: Value) -> Result<Value, String> {
    let Value::Tuple(args) = args else {
        return Err(format!(
            "REDUCE arguments are a {}, expected a tuple",
            args.kind()
        ));
    };
    let Value::Global(g) = callable else {
        return Err(format!(
            "REDUCE on a {}, expected a global",
            callable.kind()
        ));
    };
    match g {
        Global::OrderedDict if args.is_empty() => Ok(Value::Dict(Rc::default())),
        Global::RebuildTensorV2 => match args.as_slice() {
            [Value::Storage(s), offset, size, stride, ..] => {
                let size = ints(size, "tensor size")?;
                let stride = ints(stride, "tensor stride")?;
                if size.len() != stride.len() {
                    return Err(format!(
                        "tensor size {size:?} and stride {stride:?} differ in rank"
                    ));
                }
                Ok(Value::Tensor(Rc::new(TensorRef {
                    storage: StorageRef::clone(s),
                    offset: int(offset, "storage offset")?,
                    size,
                    stride,
                })))
            }
            _ => Err("unexpected arguments to _rebuild_tensor_v2".to_string()),
        },
        Global::RebuildParameter => match args.first() {
            Some(t @ Value::Tensor(_)) => Ok(t.clone()),
            _ => Err("unexpected arguments to _rebuild_parameter".to_string()),
        },
        other => Err(format!("cannot call {other:?} here")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(p: &mut Vec<u8>, v: &str) {
        p.push(0x8c);
        p.push(v.len() as u8);
        p.extend(v.as_bytes());
    }

    /// Protocol-4 spelling of `OrderedDict([("w", Parameter(tensor))])` with `_metadata` state.
    fn protocol4_state_dict() -> Vec<u8> {
        let mut p = vec![0x80, 4, 0x95];
        p.extend(0u64.to_le_bytes());
        s(&mut p, "collections");
        s(&mut p, "OrderedDict");
        p.extend([0x93, 0x94, b')', b'R', 0x94, b'(']);
        s(&mut p, "w");
        s(&mut p, "torch._utils");
        s(&mut p, "_rebuild_parameter");
        p.push(0x93);
        s(&mut p, "torch._utils");
        s(&mut p, "_rebuild_tensor_v2");
        p.extend([0x93, b'(', b'(']);
        s(&mut p, "storage");
        s(&mut p, "torch");
        s(&mut p, "bfloat16");
        p.push(0x93);
        s(&mut p, "0");
        s(&mut p, "cpu");
        // numel 300 as LONG1, offset 0, size (3, 100), stride (100, 1)
        p.extend([
            0x8a, 2, 0x2c, 0x01, b't', b'Q', b'K', 0, b'K', 3, b'K', 100, 0x86,
        ]);
        p.extend([
            b'K', 100, b'K', 1, 0x86, 0x89, b'N', b't', b'R', 0x88, b'N', 0x87, b'R',
        ]);
        p.extend([b'u', b'}', b'b', b'.']);
        p
    }

    #[test]
    fn checkpoint_pickle_protocol4_parameter() {
        let sd = load_state_dict(&protocol4_state_dict()).unwrap();
        assert_eq!(sd.len(), 1);
        let (name, t) = &sd[0];
        assert_eq!(name, "w");
        assert_eq!(t.storage.ty.dtype, Some(DType::BF16));
        assert_eq!(t.storage.numel, 300);
        assert_eq!(
            (t.offset, &t.size, &t.stride),
            (0, &vec![3, 100], &vec![100, 1])
        );
    }

    #[test]
    fn checkpoint_pickle_long1_sign() {
        let mut m = Machine::new(&[
            0x8a, 1, 0xff, 0x8a, 2, 0x00, 0x80, 0x8a, 3, 0x00, 0x80, 0x00, 0x8a, 0,
        ]);
        for _ in 0..4 {
            let op = m.byte().unwrap();
            m.step(op).unwrap();
        }
        let ints: Vec<i64> = m
            .stack
            .iter()
            .map(|v| match v {
                Value::Int(i) => *i,
                _ => panic!("not an int"),
            })
            .collect();
        assert_eq!(ints, vec![-1, -32768, 32768, 0]);
    }

    #[test]
    fn checkpoint_pickle_rejects() {
        let cases: &[(&[u8], &str)] = &[
            (b"\x80\x02cposix\nsystem\n.", "posix.system"),
            (b"\x80\x02ctorch\nload\n.", "torch.load"),
            (
                b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n)\x81.",
                "opcode 0x81",
            ),
            (b"\x80\x02}", "truncated"),
            (b"\x80\x02t.", "MARK"),
            (b"\x80\x02R.", "underflow"),
            (b"\x80\x02h\x05.", "memo entry 5"),
            (b"\x80\x02].", "list"),
            (b"\x80\x02J\xff\xff\xff\xff\x85Q.", "persistent id"),
        ];
        for (pkl, want) in cases {
            let err = load_state_dict(pkl).unwrap_err();
            assert!(err.contains(want), "{err:?} lacks {want:?}");
        }
    }
}
