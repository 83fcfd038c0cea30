//! A bounded reader of the files `torch.save` writes: a zip archive holding
//! `<name>/data.pkl` (a pickle, protocol 2 by default) and the raw bytes of
//! each storage under `<name>/data/<key>`. Only the opcodes such a pickle uses
//! for dicts, lists, tuples, numbers, strings and tensors are understood;
//! anything else is an error naming the opcode. Nothing is executed: globals
//! are names, and only `torch._utils._rebuild_tensor_v2` becomes a value.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use crate::error::{Error, Result};

/// Largest `data.pkl` read (bytes).
const MAX_PICKLE: u64 = 1 << 30;
/// Largest storage read (bytes).
const MAX_STORAGE: u64 = 1 << 34;
/// Most entries in the memo and on the stack.
const MAX_ITEMS: usize = 1 << 26;

/// A tensor's element type, from its storage class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Elem {
    /// `LongStorage`.
    I64,
    /// `IntStorage`.
    I32,
    /// `ShortStorage`.
    I16,
    /// `CharStorage`.
    I8,
    /// `ByteStorage`.
    U8,
    /// `BoolStorage`.
    Bool,
}

impl Elem {
    fn from_storage(name: &str) -> Option<Elem> {
        Some(match name {
            "LongStorage" => Elem::I64,
            "IntStorage" => Elem::I32,
            "ShortStorage" => Elem::I16,
            "CharStorage" => Elem::I8,
            "ByteStorage" => Elem::U8,
            "BoolStorage" => Elem::Bool,
            _ => return None,
        })
    }
    fn size(self) -> usize {
        match self {
            Elem::I64 => 8,
            Elem::I32 => 4,
            Elem::I16 => 2,
            Elem::I8 | Elem::U8 | Elem::Bool => 1,
        }
    }
}

/// A tensor reference: where its storage is and how it is viewed.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorRef {
    /// Storage key (`data/<key>` in the archive).
    pub key: String,
    /// Element type.
    pub elem: Elem,
    /// Elements in the storage.
    pub storage_numel: u64,
    /// Offset into the storage, in elements.
    pub offset: u64,
    /// Shape.
    pub shape: Vec<usize>,
    /// Strides, in elements.
    pub stride: Vec<usize>,
}

/// A value of the pickle.
#[derive(Debug, Clone)]
pub enum Value {
    /// `None`.
    None,
    /// `True` / `False`.
    Bool(bool),
    /// An integer that fits in i64.
    Int(i64),
    /// A float.
    Float(#[allow(dead_code)] f64),
    /// A str.
    Str(Rc<str>),
    /// A list (shared: the memo and the stack see the same one).
    List(Rc<RefCell<Vec<Value>>>),
    /// A tuple.
    Tuple(Rc<Vec<Value>>),
    /// A dict, in insertion order.
    Dict(Rc<RefCell<Vec<(Value, Value)>>>),
    /// An integer tensor.
    Tensor(Rc<TensorRef>),
    /// A global name (`module`, `name`).
    Global(Rc<(String, String)>),
    /// A persistent id (a storage tuple).
    Storage(Rc<(Elem, String, u64)>),
    /// An object this reader does not model (its constructor's name).
    Opaque(#[allow(dead_code)] Rc<str>),
    /// The MARK sentinel.
    Mark,
}

impl Value {
    /// The dict entry `key` (string keys).
    pub fn get(&self, key: &str) -> Option<Value> {
        match self {
            Value::Dict(d) => d
                .borrow()
                .iter()
                .find(|(k, _)| matches!(k, Value::Str(s) if &**s == key))
                .map(|(_, v)| v.clone()),
            _ => None,
        }
    }
    /// The items of a list or tuple.
    pub fn items(&self) -> Option<Vec<Value>> {
        match self {
            Value::List(l) => Some(l.borrow().clone()),
            Value::Tuple(t) => Some(t.to_vec()),
            _ => None,
        }
    }
    /// An integer.
    pub fn int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Bool(b) => Some(i64::from(*b)),
            _ => None,
        }
    }
    /// A list of integers.
    pub fn ints(&self) -> Option<Vec<i64>> {
        self.items()?.iter().map(Value::int).collect()
    }
}

/// A `torch.save` file: its root value and its archive, to read storages from.
pub struct TorchFile {
    path: PathBuf,
    prefix: String,
    zip: zip::ZipArchive<std::fs::File>,
    file_len: u64,
    /// The unpickled root object.
    pub root: Value,
}

impl TorchFile {
    /// Opens `path` and unpickles its `data.pkl`.
    pub fn open(path: &Path) -> Result<TorchFile> {
        let bad = |reason: String| Error::Input {
            path: path.to_path_buf(),
            reason,
        };
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // No entry of a stored (uncompressed) archive is larger than the file.
        let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let mut zip = zip::ZipArchive::new(file)
            .map_err(|e| bad(format!("not a torch.save zip archive: {e}")))?;
        let pkl = zip
            .file_names()
            .find_map(|n| {
                let n = n.ok()?;
                (n.ends_with("/data.pkl") && n.matches('/').count() == 1).then(|| n.to_string())
            })
            .ok_or_else(|| bad("the archive has no `<name>/data.pkl`".into()))?;
        let prefix = pkl.trim_end_matches("data.pkl").to_string();
        let bytes = read_entry(&mut zip, &pkl, MAX_PICKLE.min(file_len)).map_err(bad)?;
        let root = unpickle(&bytes).map_err(|e| bad(format!("{pkl}: {e}")))?;
        Ok(TorchFile {
            path: path.to_path_buf(),
            prefix,
            zip,
            file_len,
            root,
        })
    }

    /// The tensor's elements, row-major, as i64.
    pub fn ints(&mut self, t: &TensorRef) -> Result<Vec<i64>> {
        let bad = |reason: String| Error::Input {
            path: self.path.clone(),
            reason,
        };
        let name = format!("{}data/{}", self.prefix, t.key);
        let need = t
            .storage_numel
            .checked_mul(t.elem.size() as u64)
            .filter(|&n| n <= MAX_STORAGE)
            .ok_or_else(|| bad(format!("storage `{}` is too large", t.key)))?;
        if need > self.file_len {
            return Err(bad(format!(
                "storage `{}` needs {need} bytes, more than the file holds",
                t.key
            )));
        }
        let bytes =
            read_entry(&mut self.zip, &name, MAX_STORAGE.min(self.file_len)).map_err(&bad)?;
        if (bytes.len() as u64) < need {
            return Err(bad(format!(
                "storage `{}` holds {} bytes, its tensor needs {need}",
                t.key,
                bytes.len()
            )));
        }
        let numel = t
            .shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .ok_or_else(|| bad("tensor shape overflows".into()))?;
        // A view larger than its storage (an expanded, stride-0 view) is not
        // something the recorder writes; refusing it bounds the allocation.
        if numel as u64 > t.storage_numel {
            return Err(bad(format!(
                "tensor of {numel} elements views a storage of {}",
                t.storage_numel
            )));
        }
        if t.shape.len() != t.stride.len() {
            return Err(bad("tensor shape and stride differ in rank".into()));
        }
        // The largest element index the view reaches must lie in the storage.
        if numel > 0 {
            let last = t
                .shape
                .iter()
                .zip(&t.stride)
                .try_fold(t.offset, |acc, (&d, &s)| {
                    (d as u64 - 1)
                        .checked_mul(s as u64)
                        .and_then(|x| acc.checked_add(x))
                });
            if last.is_none_or(|l| l >= t.storage_numel) {
                return Err(bad(format!(
                    "tensor view reaches past the end of storage `{}`",
                    t.key
                )));
            }
        }
        let size = t.elem.size();
        let read = |i: usize| -> i64 {
            let b = &bytes[i * size..(i + 1) * size];
            match t.elem {
                Elem::I64 => i64::from_le_bytes(b.try_into().expect("8 bytes")),
                Elem::I32 => i64::from(i32::from_le_bytes(b.try_into().expect("4 bytes"))),
                Elem::I16 => i64::from(i16::from_le_bytes(b.try_into().expect("2 bytes"))),
                Elem::I8 => i64::from(b[0] as i8),
                Elem::U8 | Elem::Bool => i64::from(b[0]),
            }
        };
        let mut out = Vec::with_capacity(numel);
        let mut idx = vec![0usize; t.shape.len()];
        for _ in 0..numel {
            let at = t.offset as usize
                + idx
                    .iter()
                    .zip(&t.stride)
                    .map(|(&i, &s)| i * s)
                    .sum::<usize>();
            out.push(read(at));
            for d in (0..idx.len()).rev() {
                idx[d] += 1;
                if idx[d] < t.shape[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
        Ok(out)
    }
}

fn read_entry(
    zip: &mut zip::ZipArchive<std::fs::File>,
    name: &str,
    limit: u64,
) -> std::result::Result<Vec<u8>, String> {
    let entry = zip
        .by_name(name)
        .map_err(|e| format!("archive entry `{name}`: {e}"))?;
    let size = entry.size();
    if size > limit {
        return Err(format!(
            "archive entry `{name}` of {size} bytes exceeds the limit of {limit}"
        ));
    }
    let mut bytes = Vec::with_capacity(size as usize);
    entry
        .take(limit)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("archive entry `{name}`: {e}"))?;
    Ok(bytes)
}

/// Unpickles `data` (the opcodes of protocols 2–4 that plain data and torch
/// tensors use).
pub fn unpickle(data: &[u8]) -> std::result::Result<Value, String> {
    let mut pos = 0usize;
    let mut stack: Vec<Value> = Vec::new();
    let mut memo: HashMap<u32, Value> = HashMap::new();
    let take = |pos: &mut usize, n: usize| -> std::result::Result<&[u8], String> {
        let end = pos
            .checked_add(n)
            .filter(|&e| e <= data.len())
            .ok_or_else(|| format!("truncated pickle at byte {pos}"))?;
        let s = &data[*pos..end];
        *pos = end;
        Ok(s)
    };
    let u32le = |b: &[u8]| u32::from_le_bytes(b.try_into().expect("4 bytes"));
    fn pop(stack: &mut Vec<Value>) -> std::result::Result<Value, String> {
        stack
            .pop()
            .ok_or_else(|| "pickle stack underflow".to_string())
    }
    fn pop_mark(stack: &mut Vec<Value>) -> std::result::Result<Vec<Value>, String> {
        let at = stack
            .iter()
            .rposition(|v| matches!(v, Value::Mark))
            .ok_or_else(|| "pickle MARK missing".to_string())?;
        let items = stack.split_off(at + 1);
        stack.pop();
        Ok(items)
    }
    fn text(b: &[u8]) -> std::result::Result<Rc<str>, String> {
        std::str::from_utf8(b)
            .map(Rc::from)
            .map_err(|_| "pickle string is not UTF-8".to_string())
    }
    loop {
        if stack.len() > MAX_ITEMS || memo.len() > MAX_ITEMS {
            return Err("pickle holds too many items".into());
        }
        let op = take(&mut pos, 1)?[0];
        match op {
            0x80 => {
                take(&mut pos, 1)?;
            } // PROTO
            0x95 => {
                take(&mut pos, 8)?;
            } // FRAME
            b'.' => return pop(&mut stack),
            b'(' => stack.push(Value::Mark),
            b'N' => stack.push(Value::None),
            0x88 => stack.push(Value::Bool(true)),
            0x89 => stack.push(Value::Bool(false)),
            b'J' => {
                let b = take(&mut pos, 4)?;
                stack.push(Value::Int(i64::from(i32::from_le_bytes(
                    b.try_into().expect("4"),
                ))));
            }
            b'K' => stack.push(Value::Int(i64::from(take(&mut pos, 1)?[0]))),
            b'M' => {
                let b = take(&mut pos, 2)?;
                stack.push(Value::Int(i64::from(u16::from_le_bytes([b[0], b[1]]))));
            }
            0x8a => {
                // LONG1: little-endian two's complement of n bytes.
                let n = usize::from(take(&mut pos, 1)?[0]);
                let b = take(&mut pos, n)?;
                if n > 8 {
                    return Err(format!("integer of {n} bytes is too large"));
                }
                let mut v: i64 = 0;
                for (i, &x) in b.iter().enumerate() {
                    v |= i64::from(x) << (8 * i);
                }
                if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                    v -= 1i64 << (8 * n);
                }
                stack.push(Value::Int(v));
            }
            b'G' => {
                let b = take(&mut pos, 8)?;
                stack.push(Value::Float(f64::from_be_bytes(b.try_into().expect("8"))));
            }
            b'X' => {
                let n = u32le(take(&mut pos, 4)?) as usize;
                let s = text(take(&mut pos, n)?)?;
                stack.push(Value::Str(s));
            }
            0x8c => {
                let n = usize::from(take(&mut pos, 1)?[0]);
                let s = text(take(&mut pos, n)?)?;
                stack.push(Value::Str(s));
            }
            0x8d => {
                let b = take(&mut pos, 8)?;
                let n = usize::try_from(u64::from_le_bytes(b.try_into().expect("8")))
                    .map_err(|_| "string too long".to_string())?;
                let s = text(take(&mut pos, n)?)?;
                stack.push(Value::Str(s));
            }
            b'C' => {
                let n = usize::from(take(&mut pos, 1)?[0]);
                take(&mut pos, n)?;
                stack.push(Value::Opaque("bytes".into()));
            }
            b'B' => {
                let n = u32le(take(&mut pos, 4)?) as usize;
                take(&mut pos, n)?;
                stack.push(Value::Opaque("bytes".into()));
            }
            b'}' => stack.push(Value::Dict(Rc::default())),
            b']' => stack.push(Value::List(Rc::default())),
            b')' => stack.push(Value::Tuple(Rc::default())),
            b't' => {
                let items = pop_mark(&mut stack)?;
                stack.push(Value::Tuple(Rc::new(items)));
            }
            0x85..=0x87 => {
                let n = usize::from(op - 0x84);
                if stack.len() < n {
                    return Err("pickle stack underflow".into());
                }
                let items = stack.split_off(stack.len() - n);
                stack.push(Value::Tuple(Rc::new(items)));
            }
            b'a' => {
                let v = pop(&mut stack)?;
                match stack.last() {
                    Some(Value::List(l)) => l.borrow_mut().push(v),
                    _ => return Err("APPEND to a non-list".into()),
                }
            }
            b'e' => {
                let items = pop_mark(&mut stack)?;
                match stack.last() {
                    Some(Value::List(l)) => l.borrow_mut().extend(items),
                    _ => return Err("APPENDS to a non-list".into()),
                }
            }
            b's' | b'u' => {
                let items = if op == b's' {
                    let v = pop(&mut stack)?;
                    let k = pop(&mut stack)?;
                    vec![k, v]
                } else {
                    pop_mark(&mut stack)?
                };
                if items.len() % 2 != 0 {
                    return Err("SETITEMS with an odd number of items".into());
                }
                match stack.last() {
                    Some(Value::Dict(d)) => {
                        let mut d = d.borrow_mut();
                        let mut it = items.into_iter();
                        while let (Some(k), Some(v)) = (it.next(), it.next()) {
                            d.push((k, v));
                        }
                    }
                    _ => return Err("SETITEM on a non-dict".into()),
                }
            }
            b'q' => {
                let i = u32::from(take(&mut pos, 1)?[0]);
                memo.insert(i, stack.last().cloned().ok_or("empty stack")?);
            }
            b'r' => {
                let i = u32le(take(&mut pos, 4)?);
                memo.insert(i, stack.last().cloned().ok_or("empty stack")?);
            }
            0x94 => {
                let i = memo.len() as u32;
                memo.insert(i, stack.last().cloned().ok_or("empty stack")?);
            }
            b'h' | b'j' => {
                let i = if op == b'h' {
                    u32::from(take(&mut pos, 1)?[0])
                } else {
                    u32le(take(&mut pos, 4)?)
                };
                stack.push(
                    memo.get(&i)
                        .cloned()
                        .ok_or_else(|| format!("memo entry {i} missing"))?,
                );
            }
            b'c' => {
                let line = |pos: &mut usize| -> std::result::Result<String, String> {
                    let rest = &data[*pos..];
                    let n = rest
                        .iter()
                        .position(|&b| b == b'\n')
                        .ok_or("unterminated GLOBAL")?;
                    let s = std::str::from_utf8(&rest[..n])
                        .map_err(|_| "GLOBAL name is not UTF-8")?
                        .to_string();
                    *pos += n + 1;
                    Ok(s)
                };
                let module = line(&mut pos)?;
                let name = line(&mut pos)?;
                stack.push(Value::Global(Rc::new((module, name))));
            }
            0x93 => {
                let name = pop(&mut stack)?;
                let module = pop(&mut stack)?;
                match (module, name) {
                    (Value::Str(m), Value::Str(n)) => {
                        stack.push(Value::Global(Rc::new((m.to_string(), n.to_string()))))
                    }
                    _ => return Err("STACK_GLOBAL without two strings".into()),
                }
            }
            b'Q' => {
                let pid = pop(&mut stack)?;
                stack.push(storage(&pid)?);
            }
            b'R' | 0x81 => {
                let args = pop(&mut stack)?;
                let f = pop(&mut stack)?;
                stack.push(reduce(&f, &args)?);
            }
            b'b' => {
                pop(&mut stack)?; // state: ignored (only plain objects are modelled)
            }
            other => {
                return Err(format!(
                    "unsupported pickle opcode 0x{other:02x} at byte {}",
                    pos - 1
                ))
            }
        }
    }
}

/// A persistent id `('storage', torch.<T>Storage, key, location, numel)`.
fn storage(pid: &Value) -> std::result::Result<Value, String> {
    let items = pid.items().ok_or("persistent id is not a tuple")?;
    match items.as_slice() {
        [Value::Str(tag), Value::Global(g), Value::Str(key), _location, numel]
            if &**tag == "storage" =>
        {
            let elem = Elem::from_storage(&g.1).ok_or_else(|| {
                format!("tensor storage `{}.{}` is not an integer type", g.0, g.1)
            })?;
            let numel = numel
                .int()
                .and_then(|n| u64::try_from(n).ok())
                .ok_or("storage size is not a count")?;
            Ok(Value::Storage(Rc::new((elem, key.to_string(), numel))))
        }
        _ => Err("persistent id is not a torch storage".into()),
    }
}

/// REDUCE: only `_rebuild_tensor_v2` builds a value; other callables give
/// an opaque object.
fn reduce(f: &Value, args: &Value) -> std::result::Result<Value, String> {
    let Value::Global(g) = f else {
        return Err("REDUCE on a non-global".into());
    };
    if g.0 == "torch._utils" && g.1 == "_rebuild_tensor_v2" {
        let a = args.items().ok_or("tensor arguments are not a tuple")?;
        let (Some(Value::Storage(s)), Some(offset), Some(shape), Some(stride)) =
            (a.first(), a.get(1), a.get(2), a.get(3))
        else {
            return Err("malformed _rebuild_tensor_v2 arguments".into());
        };
        let dims = |v: &Value| -> std::result::Result<Vec<usize>, String> {
            v.ints()
                .ok_or("tensor size is not a tuple of ints")?
                .into_iter()
                .map(|x| usize::try_from(x).map_err(|_| format!("negative tensor size {x}")))
                .collect()
        };
        let offset = offset
            .int()
            .and_then(|x| u64::try_from(x).ok())
            .ok_or("tensor offset is not a count")?;
        return Ok(Value::Tensor(Rc::new(TensorRef {
            key: s.1.clone(),
            elem: s.0,
            storage_numel: s.2,
            offset,
            shape: dims(shape)?,
            stride: dims(stride)?,
        })));
    }
    Ok(Value::Opaque(format!("{}.{}", g.0, g.1).into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `pickle.dumps({'a': [1, -2, 300, 70000, 2**40], 'b': None, 'c': ('x', True)}, protocol=2)`,
    /// with the list memoized and fetched again under key 'd'.
    #[test]
    fn reads_protocol_2_containers_numbers_and_memo() {
        let mut p: Vec<u8> = vec![0x80, 2, b'}', b'q', 0, b'('];
        p.extend(b"X\x01\x00\x00\x00a");
        p.extend(b"]q\x01(K\x01J\xfe\xff\xff\xffM\x2c\x01J\x70\x11\x01\x00\x8a\x06\x00\x00\x00\x00\x00\x01e");
        p.extend(b"X\x01\x00\x00\x00bN");
        p.extend(b"X\x01\x00\x00\x00c\x8c\x01x\x88\x86");
        p.extend(b"X\x01\x00\x00\x00dh\x01");
        p.extend(b"u.");
        let v = unpickle(&p).unwrap();
        let want = vec![1, -2, 300, 70000, 1i64 << 40];
        assert_eq!(v.get("a").unwrap().ints().unwrap(), want);
        assert_eq!(
            v.get("d").unwrap().ints().unwrap(),
            want,
            "memo shares the list"
        );
        assert!(matches!(v.get("b"), Some(Value::None)));
        let c = v.get("c").unwrap().items().unwrap();
        assert!(matches!(&c[0], Value::Str(s) if &**s == "x"));
        assert!(matches!(c[1], Value::Bool(true)));
    }

    #[test]
    fn refuses_truncated_and_unknown_pickles() {
        assert!(unpickle(b"\x80\x02]q").unwrap_err().contains("truncated"));
        assert!(unpickle(b"\x80\x02i")
            .unwrap_err()
            .contains("unsupported pickle opcode 0x69"));
        assert!(unpickle(b"\x80\x02h\x05.")
            .unwrap_err()
            .contains("memo entry 5 missing"));
        assert!(unpickle(b"e").unwrap_err().contains("MARK"));
        // A negative LONG1 and a string longer than the data.
        assert_eq!(unpickle(b"\x8a\x02\x00\xff.").unwrap().int(), Some(-256));
        assert!(unpickle(b"X\xff\xff\xff\xffab")
            .unwrap_err()
            .contains("truncated"));
        // A non-integer storage is refused by name.
        let mut p = b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x04tQ.".to_vec();
        assert!(unpickle(&p).unwrap_err().contains("FloatStorage"));
        p.clear();
    }
}
