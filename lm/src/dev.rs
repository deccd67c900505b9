//! Writing checkpoint files, for tools and tests (never for running a model): the one writer of
//! `torch.save` archives (a protocol-2 pickle of an `OrderedDict` of
//! `torch._utils._rebuild_tensor_v2` calls, in a ZIP of STORED entries aligned to 64 bytes like
//! torch's miniz writer, with zip64 fields where an entry or the archive outgrows 32 bits) and of
//! safetensors headers. `qwenvl dev random-checkpoint` streams full-size checkpoints through it;
//! the tests build small, strided, damaged and hostile files with it.

use std::io::{self, Seek, SeekFrom, Write};

/// Python pickle protocol 2, memoising like CPython's pickler does. The opcodes it does not
/// wrap can be pushed to `out` directly.
#[derive(Debug)]
pub struct Pickler {
    pub out: Vec<u8>,
    memo: u32,
}

impl Default for Pickler {
    fn default() -> Self {
        Self::new()
    }
}

impl Pickler {
    /// PROTO 2.
    pub fn new() -> Self {
        Self {
            out: vec![0x80, 2],
            memo: 0,
        }
    }

    /// BINPUT of the top of the stack under the next memo index.
    pub fn put(&mut self) {
        if let Ok(i) = u8::try_from(self.memo) {
            self.out.extend([b'q', i]);
        } else {
            self.out.push(b'r');
            self.out.extend(self.memo.to_le_bytes());
        }
        self.memo += 1;
    }

    /// BINGET of memo `idx`.
    pub fn get(&mut self, idx: u32) {
        if let Ok(i) = u8::try_from(idx) {
            self.out.extend([b'h', i]);
        } else {
            self.out.push(b'j');
            self.out.extend(idx.to_le_bytes());
        }
    }

    /// GLOBAL, memoised; returns its memo index.
    pub fn global(&mut self, module: &str, name: &str) -> u32 {
        self.out.push(b'c');
        self.out.extend(format!("{module}\n{name}\n").as_bytes());
        self.put();
        self.memo - 1
    }

    /// BINUNICODE, memoised; returns its memo index.
    pub fn string(&mut self, s: &str) -> u32 {
        self.out.push(b'X');
        self.out.extend((s.len() as u32).to_le_bytes());
        self.out.extend(s.as_bytes());
        self.put();
        self.memo - 1
    }

    /// The smallest int opcode CPython would use.
    pub fn int(&mut self, v: u64) {
        if let Ok(b) = u8::try_from(v) {
            self.out.extend([b'K', b]);
        } else if let Ok(b) = u16::try_from(v) {
            self.out.push(b'M');
            self.out.extend(b.to_le_bytes());
        } else if let Ok(b) = i32::try_from(v) {
            self.out.push(b'J');
            self.out.extend(b.to_le_bytes());
        } else {
            // LONG1: minimal two's complement, little endian, as CPython encodes it.
            let mut bytes = v.to_le_bytes().to_vec();
            while bytes.len() > 1 && bytes[bytes.len() - 1] == 0 && bytes[bytes.len() - 2] < 0x80 {
                bytes.pop();
            }
            if bytes.last().is_some_and(|&b| b >= 0x80) {
                bytes.push(0);
            }
            self.out.extend([0x8a, bytes.len() as u8]);
            self.out.extend(bytes);
        }
    }

    /// A tuple of ints (TUPLE1..3 or MARK..TUPLE), memoised unless empty.
    pub fn int_tuple(&mut self, vals: &[u64]) {
        match vals.len() {
            0 => {
                self.out.push(b')');
                return;
            }
            1..=3 => {
                vals.iter().for_each(|&v| self.int(v));
                self.out.push(0x84 + vals.len() as u8);
            }
            _ => {
                self.out.push(b'(');
                vals.iter().for_each(|&v| self.int(v));
                self.out.push(b't');
            }
        }
        self.put();
    }

    /// STOP; the pickle's bytes.
    pub fn finish(mut self) -> Vec<u8> {
        self.out.push(b'.');
        self.out
    }
}

/// One tensor of a state dict: a view (`offset`, `size`, `stride`, in elements) of the storage
/// `torch.<storage_type>` saved under `key` with `numel` elements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorEntry {
    pub name: String,
    pub storage_type: String,
    pub key: String,
    pub numel: u64,
    pub offset: u64,
    pub size: Vec<u64>,
    pub stride: Vec<u64>,
}

impl TensorEntry {
    /// A whole, row-major tensor of `shape` over its own storage `key`.
    pub fn contiguous(name: &str, storage_type: &str, key: &str, shape: &[u64]) -> Self {
        Self {
            name: name.to_string(),
            storage_type: storage_type.to_string(),
            key: key.to_string(),
            numel: shape.iter().product(),
            offset: 0,
            size: shape.to_vec(),
            stride: row_major_strides(shape),
        }
    }
}

/// The strides of a row-major tensor of `shape`.
pub fn row_major_strides(shape: &[u64]) -> Vec<u64> {
    let mut stride = vec![1u64; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        stride[d] = stride[d + 1] * shape[d + 1];
    }
    stride
}

/// `data.pkl` of `torch.save(OrderedDict(name -> tensor))`, memoised like CPython (globals and
/// repeated strings are fetched back from the memo).
pub fn state_dict_pickle(tensors: &[TensorEntry]) -> Vec<u8> {
    let mut p = Pickler::new();
    let ordered_dict = p.global("collections", "OrderedDict");
    p.out.extend([b')', b'R']);
    p.put();
    let mut rebuild = None;
    let mut storage_tag = None;
    let mut storage_types: Vec<(String, u32)> = Vec::new();
    let mut cpu = None;
    // CPython's `_batch_setitems` groups 1000 items per SETITEMS.
    for batch in tensors.chunks(1000) {
        if batch.len() > 1 {
            p.out.push(b'(');
        }
        for t in batch {
            p.string(&t.name);
            match rebuild {
                Some(m) => p.get(m),
                None => rebuild = Some(p.global("torch._utils", "_rebuild_tensor_v2")),
            }
            p.out.extend([b'(', b'(']);
            match storage_tag {
                Some(m) => p.get(m),
                None => storage_tag = Some(p.string("storage")),
            }
            match storage_types.iter().find(|(s, _)| *s == t.storage_type) {
                Some(&(_, m)) => p.get(m),
                None => {
                    let m = p.global("torch", &t.storage_type);
                    storage_types.push((t.storage_type.clone(), m));
                }
            }
            p.string(&t.key);
            match cpu {
                Some(m) => p.get(m),
                None => cpu = Some(p.string("cpu")),
            }
            p.int(t.numel);
            p.out.push(b't');
            p.put();
            p.out.push(b'Q'); // BINPERSID
            p.int(t.offset);
            p.int_tuple(&t.size);
            p.int_tuple(&t.stride);
            p.out.push(0x89); // requires_grad = False
            p.get(ordered_dict); // backward_hooks = OrderedDict()
            p.out.extend([b')', b'R']);
            p.put();
            p.out.push(b't');
            p.put();
            p.out.push(b'R');
            p.put();
        }
        p.out.push(if batch.len() > 1 { b'u' } else { b's' });
    }
    p.finish()
}

/// One finished zip entry, for the central directory.
struct ZipRecord {
    name: String,
    crc: u32,
    size: u64,
    offset: u64,
}

/// Entries' data start on this boundary (torch's `FB` padding field).
const ALIGN: u64 = 64;
const U32_MAX: u64 = 0xFFFF_FFFF;

/// A streaming writer of STORED zip entries laid out like torch's (miniz) archives: each entry's
/// data starts on a 64-byte boundary thanks to an `FB` padding extra field; sizes and offsets
/// from `zip64_at` on (2³² − 1 in real files, lower in tests) go to zip64 fields.
pub struct ZipWriter<W: Write + Seek> {
    w: W,
    pos: u64,
    records: Vec<ZipRecord>,
    /// The entry being written: record, bytes written, CRC state.
    open: Option<(ZipRecord, u64, crc32fast::Hasher)>,
    zip64_at: u64,
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

impl<W: Write + Seek> ZipWriter<W> {
    /// A writer at the start of `w` (which must be empty there).
    pub fn new(w: W, zip64_at: u64) -> Self {
        Self {
            w,
            pos: 0,
            records: Vec::new(),
            open: None,
            zip64_at: zip64_at.min(U32_MAX),
        }
    }

    fn raw(&mut self, b: &[u8]) -> io::Result<()> {
        self.w.write_all(b)?;
        self.pos += b.len() as u64;
        Ok(())
    }

    /// A whole entry at once.
    pub fn small(&mut self, name: &str, data: &[u8]) -> io::Result<()> {
        self.begin(name, data.len() as u64)?;
        self.data(data)?;
        self.end()
    }

    /// Writes the local header of an entry of `size` bytes; its CRC is patched in by `end`.
    pub fn begin(&mut self, name: &str, size: u64) -> io::Result<()> {
        if self.open.is_some() {
            return Err(invalid(format!("zip entry {name} opened inside another")));
        }
        let offset = self.pos;
        let zip64 = size >= self.zip64_at;
        let mut extra = Vec::new();
        if zip64 {
            extra.extend(1u16.to_le_bytes());
            extra.extend(16u16.to_le_bytes());
            extra.extend(size.to_le_bytes());
            extra.extend(size.to_le_bytes());
        }
        let end = offset + 30 + name.len() as u64 + extra.len() as u64 + 4;
        let pad = (ALIGN - end % ALIGN) % ALIGN;
        extra.extend(b"FB");
        extra.extend((pad as u16).to_le_bytes());
        extra.extend(std::iter::repeat_n(b'Z', pad as usize));
        let size32 = if zip64 { U32_MAX as u32 } else { size as u32 };
        let mut h = Vec::with_capacity(30 + name.len() + extra.len());
        h.extend(0x0403_4b50u32.to_le_bytes());
        h.extend((if zip64 { 45u16 } else { 20 }).to_le_bytes()); // version needed
        h.extend(0u16.to_le_bytes()); // flags
        h.extend(0u16.to_le_bytes()); // method: stored
        h.extend(0u16.to_le_bytes()); // time
        h.extend(0x21u16.to_le_bytes()); // date: 1980-01-01
        h.extend(0u32.to_le_bytes()); // crc, patched by `end`
        h.extend(size32.to_le_bytes());
        h.extend(size32.to_le_bytes());
        h.extend((name.len() as u16).to_le_bytes());
        h.extend((extra.len() as u16).to_le_bytes());
        h.extend(name.as_bytes());
        h.extend(&extra);
        self.raw(&h)?;
        let rec = ZipRecord {
            name: name.to_string(),
            crc: 0,
            size,
            offset,
        };
        self.open = Some((rec, 0, crc32fast::Hasher::new()));
        Ok(())
    }

    /// More of the open entry's data.
    pub fn data(&mut self, b: &[u8]) -> io::Result<()> {
        let Some((_, written, crc)) = self.open.as_mut() else {
            return Err(invalid("zip data written outside an entry".into()));
        };
        *written += b.len() as u64;
        crc.update(b);
        self.raw(b)
    }

    /// Closes the open entry.
    pub fn end(&mut self) -> io::Result<()> {
        let Some((mut rec, written, crc)) = self.open.take() else {
            return Err(invalid("no zip entry to close".into()));
        };
        if written != rec.size {
            return Err(invalid(format!(
                "zip entry {}: {written} bytes written, {} announced",
                rec.name, rec.size
            )));
        }
        rec.crc = crc.finalize();
        // Patch the CRC (offset 14 of the local header) and return to the end.
        self.w.seek(SeekFrom::Start(rec.offset + 14))?;
        self.w.write_all(&rec.crc.to_le_bytes())?;
        self.w.seek(SeekFrom::Start(self.pos))?;
        self.records.push(rec);
        Ok(())
    }

    /// Central directory, then the zip64 end records (torch always writes them) and the classic
    /// end record, with 0xFF.. in the fields that do not fit. Returns the writer.
    pub fn finish(mut self) -> io::Result<W> {
        if self.open.is_some() {
            return Err(invalid("zip entry left open".into()));
        }
        let cd_offset = self.pos;
        let records = std::mem::take(&mut self.records);
        for r in &records {
            let big_size = r.size >= self.zip64_at;
            let big_offset = r.offset >= self.zip64_at;
            let mut extra = Vec::new();
            if big_size {
                extra.extend(r.size.to_le_bytes());
                extra.extend(r.size.to_le_bytes());
            }
            if big_offset {
                extra.extend(r.offset.to_le_bytes());
            }
            if !extra.is_empty() {
                let mut e = 1u16.to_le_bytes().to_vec();
                e.extend((extra.len() as u16).to_le_bytes());
                e.extend(extra);
                extra = e;
            }
            let zip64 = big_size || big_offset;
            let size32 = if big_size {
                U32_MAX as u32
            } else {
                r.size as u32
            };
            let off32 = if big_offset {
                U32_MAX as u32
            } else {
                r.offset as u32
            };
            let version: u16 = if zip64 { 45 } else { 20 };
            let mut h = Vec::with_capacity(46 + r.name.len() + extra.len());
            h.extend(0x0201_4b50u32.to_le_bytes());
            h.extend(version.to_le_bytes()); // made by
            h.extend(version.to_le_bytes()); // needed
            h.extend(0u16.to_le_bytes()); // flags
            h.extend(0u16.to_le_bytes()); // method
            h.extend(0u16.to_le_bytes()); // time
            h.extend(0x21u16.to_le_bytes()); // date
            h.extend(r.crc.to_le_bytes());
            h.extend(size32.to_le_bytes());
            h.extend(size32.to_le_bytes());
            h.extend((r.name.len() as u16).to_le_bytes());
            h.extend((extra.len() as u16).to_le_bytes());
            h.extend(0u16.to_le_bytes()); // comment
            h.extend(0u16.to_le_bytes()); // disk
            h.extend(0u16.to_le_bytes()); // internal attributes
            h.extend(0u32.to_le_bytes()); // external attributes
            h.extend(off32.to_le_bytes());
            h.extend(r.name.as_bytes());
            h.extend(&extra);
            self.raw(&h)?;
        }
        let cd_size = self.pos - cd_offset;
        let count = records.len() as u64;
        let eocd64 = self.pos;
        let mut t = Vec::with_capacity(56 + 20 + 22);
        t.extend(0x0606_4b50u32.to_le_bytes());
        t.extend(44u64.to_le_bytes()); // size of the rest of the record
        t.extend(45u16.to_le_bytes());
        t.extend(45u16.to_le_bytes());
        t.extend(0u32.to_le_bytes());
        t.extend(0u32.to_le_bytes());
        t.extend(count.to_le_bytes());
        t.extend(count.to_le_bytes());
        t.extend(cd_size.to_le_bytes());
        t.extend(cd_offset.to_le_bytes());
        t.extend(0x0706_4b50u32.to_le_bytes());
        t.extend(0u32.to_le_bytes());
        t.extend(eocd64.to_le_bytes());
        t.extend(1u32.to_le_bytes());
        let count16 = u16::try_from(count).unwrap_or(u16::MAX);
        let limit = self.zip64_at;
        let sat = |v: u64| if v >= limit { u32::MAX } else { v as u32 };
        t.extend(0x0605_4b50u32.to_le_bytes());
        t.extend(0u16.to_le_bytes());
        t.extend(0u16.to_le_bytes());
        t.extend(count16.to_le_bytes());
        t.extend(count16.to_le_bytes());
        t.extend(sat(cd_size).to_le_bytes());
        t.extend(sat(cd_offset).to_le_bytes());
        t.extend(0u16.to_le_bytes()); // comment
        self.raw(&t)?;
        self.w.flush()?;
        Ok(self.w)
    }
}

/// A whole archive in memory: `entries` (name, data) in order, as [`ZipWriter`] writes them.
pub fn zip_bytes(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut z = ZipWriter::new(io::Cursor::new(Vec::new()), U32_MAX);
    for (name, data) in entries {
        z.small(name, data).expect("writing to memory");
    }
    z.finish().expect("writing to memory").into_inner()
}

/// The header of a safetensors file: its 8-byte length, then the JSON (tensors in the given
/// order, data offsets back to back, `__metadata__` first when given), padded with spaces so the
/// data starts 8-byte aligned as the safetensors library writes it. Each tensor is
/// `(name, dtype, shape, bytes)`.
pub fn safetensors_header(
    tensors: &[(&str, &str, &[usize], u64)],
    metadata: Option<serde_json::Value>,
) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    if let Some(m) = metadata {
        header.insert("__metadata__".into(), m);
    }
    let mut offset = 0u64;
    for (name, dtype, shape, bytes) in tensors {
        header.insert(
            name.to_string(),
            serde_json::json!({
                "dtype": dtype,
                "shape": shape,
                "data_offsets": [offset, offset + bytes],
            }),
        );
        offset += bytes;
    }
    let mut json = serde_json::to_vec(&header).expect("a JSON map serialises");
    while !json.len().is_multiple_of(8) {
        json.push(b' ');
    }
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend(json);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_ints_use_the_short_opcodes() {
        let mut p = Pickler::new();
        p.int(5);
        p.int(300);
        p.int(70_000);
        p.int(1 << 40);
        p.int(1 << 31); // past i32: LONG1 with a sign byte
        assert_eq!(
            p.finish(),
            [
                &[0x80, 2, b'K', 5, b'M', 0x2c, 1, b'J', 0x70, 0x11, 1, 0][..],
                &[0x8a, 6, 0, 0, 0, 0, 0, 1][..],
                &[0x8a, 5, 0, 0, 0, 0x80, 0, b'.'][..],
            ]
            .concat()
        );
    }

    #[test]
    fn safetensors_data_starts_aligned() {
        let h = safetensors_header(&[("w", "F32", &[2, 3], 24)], None);
        assert_eq!(h.len() % 8, 0);
        let n = u64::from_le_bytes(h[..8].try_into().unwrap()) as usize;
        assert_eq!(n + 8, h.len());
        let v: serde_json::Value = serde_json::from_slice(&h[8..]).unwrap();
        assert_eq!(v["w"]["data_offsets"], serde_json::json!([0, 24]));
    }
}
