//! Just enough of the zip format to find the entries of a `torch.save` archive inside a memory map:
//! the central directory (zip64 included, shards can exceed 4 GiB) and, per entry, the local header
//! that tells where its bytes start. torch stores every entry uncompressed, so an entry's data is a
//! plain byte range of the file; nothing is decompressed or copied.

/// One stored entry: its data is `data[start..start + size]` of the archive.
#[derive(Debug, Clone)]
pub(crate) struct ZipEntry {
    pub name: String,
    pub start: usize,
    pub size: usize,
}

const EOCD_SIG: u32 = 0x0605_4b50;
const EOCD64_LOCATOR_SIG: u32 = 0x0706_4b50;
const EOCD64_SIG: u32 = 0x0606_4b50;
const CENTRAL_SIG: u32 = 0x0201_4b50;
const LOCAL_SIG: u32 = 0x0403_4b50;
/// Fixed part of the end-of-central-directory record; the comment after it is at most 64 KiB.
const EOCD_LEN: usize = 22;

fn u16_at(data: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        data.get(at..at.checked_add(2)?)?.try_into().ok()?,
    ))
}

fn u32_at(data: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        data.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn u64_at(data: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        data.get(at..at.checked_add(8)?)?.try_into().ok()?,
    ))
}

fn to_usize(v: u64, what: &str) -> Result<usize, String> {
    usize::try_from(v).map_err(|_| format!("{what} {v} does not fit in memory"))
}

/// Lists the entries of the zip archive `data`. Errors are plain messages; the caller adds the path.
pub(crate) fn entries(data: &[u8]) -> Result<Vec<ZipEntry>, String> {
    let truncated = "not a complete zip archive (end of central directory not found): the file is truncated or not a torch checkpoint";
    if data.len() < EOCD_LEN {
        return Err(truncated.to_string());
    }
    // The record sits at the very end, followed only by a comment of at most 65535 bytes.
    let lowest = data.len().saturating_sub(EOCD_LEN + usize::from(u16::MAX));
    let eocd = (lowest..=data.len() - EOCD_LEN)
        .rev()
        .find(|&at| u32_at(data, at) == Some(EOCD_SIG))
        .ok_or_else(|| truncated.to_string())?;
    let bad = |what: &str| format!("corrupt zip archive: {what}");
    let mut count = u64::from(u16_at(data, eocd + 10).ok_or_else(|| bad("short record"))?);
    let mut cd_size = u64::from(u32_at(data, eocd + 12).ok_or_else(|| bad("short record"))?);
    let mut cd_offset = u64::from(u32_at(data, eocd + 16).ok_or_else(|| bad("short record"))?);
    if count == 0xFFFF || cd_size == 0xFFFF_FFFF || cd_offset == 0xFFFF_FFFF {
        // zip64: the locator right before the record points at the zip64 record.
        let loc = eocd
            .checked_sub(20)
            .filter(|&l| u32_at(data, l) == Some(EOCD64_LOCATOR_SIG))
            .ok_or_else(|| bad("zip64 locator missing"))?;
        let rec = to_usize(
            u64_at(data, loc + 8).ok_or_else(|| bad("short zip64 locator"))?,
            "zip64 record offset",
        )?;
        if u32_at(data, rec) != Some(EOCD64_SIG) {
            return Err(format!("{truncated} (zip64 record expected at byte {rec})"));
        }
        count = u64_at(data, rec + 32).ok_or_else(|| bad("short zip64 record"))?;
        cd_size = u64_at(data, rec + 40).ok_or_else(|| bad("short zip64 record"))?;
        cd_offset = u64_at(data, rec + 48).ok_or_else(|| bad("short zip64 record"))?;
    }
    let cd_start = to_usize(cd_offset, "central directory offset")?;
    let cd_end = cd_start
        .checked_add(to_usize(cd_size, "central directory size")?)
        .filter(|&e| e <= data.len())
        .ok_or_else(|| format!("{truncated} (central directory past the end of the file)"))?;
    let cd = data
        .get(cd_start..cd_end)
        .ok_or_else(|| bad("central directory"))?;

    // Every entry takes at least 46 bytes, so `count` cannot make us allocate beyond the file.
    let mut out = Vec::with_capacity(cd.len() / 46);
    let mut at = 0usize;
    for _ in 0..count {
        out.push(central_entry(data, cd, &mut at)?);
    }
    Ok(out)
}

/// Parses the central directory record at `*at` of `cd`, then the local header it points to.
fn central_entry(data: &[u8], cd: &[u8], at: &mut usize) -> Result<ZipEntry, String> {
    let bad = |what: &str| format!("corrupt zip central directory: {what}");
    let h = *at;
    if u32_at(cd, h) != Some(CENTRAL_SIG) {
        return Err(bad("entry signature"));
    }
    let short = || bad("short entry");
    let flags = u16_at(cd, h + 8).ok_or_else(short)?;
    let method = u16_at(cd, h + 10).ok_or_else(short)?;
    let comp_size = u32_at(cd, h + 20).ok_or_else(short)?;
    let size32 = u32_at(cd, h + 24).ok_or_else(short)?;
    let name_len = usize::from(u16_at(cd, h + 28).ok_or_else(short)?);
    let extra_len = usize::from(u16_at(cd, h + 30).ok_or_else(short)?);
    let comment_len = usize::from(u16_at(cd, h + 32).ok_or_else(short)?);
    let offset32 = u32_at(cd, h + 42).ok_or_else(short)?;
    let name_start = h + 46;
    let name = cd
        .get(name_start..name_start + name_len)
        .ok_or_else(short)?;
    let name = String::from_utf8_lossy(name).into_owned();
    let extra = cd
        .get(name_start + name_len..name_start + name_len + extra_len)
        .ok_or_else(short)?;
    *at = name_start + name_len + extra_len + comment_len;

    // zip64 extended information: the 64-bit values of the fields that hold 0xFFFFFFFF, in order.
    let mut size = u64::from(size32);
    let mut comp = u64::from(comp_size);
    let mut offset = u64::from(offset32);
    let mut e = 0usize;
    while e + 4 <= extra.len() {
        let id = u16_at(extra, e).ok_or_else(short)?;
        let len = usize::from(u16_at(extra, e + 2).ok_or_else(short)?);
        if id == 0x0001 {
            let mut f = e + 4;
            for (field, wide) in [
                (&mut size, size32 == u32::MAX),
                (&mut comp, comp_size == u32::MAX),
                (&mut offset, offset32 == u32::MAX),
            ] {
                if wide {
                    *field = u64_at(extra, f).ok_or_else(|| bad("short zip64 extra field"))?;
                    f += 8;
                }
            }
        }
        e += 4 + len;
    }

    if flags & 1 != 0 {
        return Err(format!("entry {name} is encrypted"));
    }
    if method != 0 || comp != size {
        return Err(format!(
            "entry {name} is compressed (method {method}); torch archives store entries uncompressed"
        ));
    }
    let local = to_usize(offset, "local header offset")?;
    let past_eof = || {
        format!(
            "truncated file: entry {name} lies past the end of the file ({} bytes)",
            data.len()
        )
    };
    if u32_at(data, local) != Some(LOCAL_SIG) {
        return Err(if local >= data.len() {
            past_eof()
        } else {
            format!("corrupt zip archive: no local header for entry {name} at byte {local}")
        });
    }
    // The local extra field may differ from the central one (torch pads it to align the data).
    let local_name = usize::from(u16_at(data, local + 26).ok_or_else(past_eof)?);
    let local_extra = usize::from(u16_at(data, local + 28).ok_or_else(past_eof)?);
    let start = local + 30 + local_name + local_extra;
    let size = to_usize(size, "entry size")?;
    if start.checked_add(size).is_none_or(|end| end > data.len()) {
        return Err(past_eof());
    }
    Ok(ZipEntry { name, start, size })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_zip_not_an_archive() {
        assert!(entries(b"PK\x03\x04 hello")
            .unwrap_err()
            .contains("truncated"));
        assert!(entries(&[0u8; 100_000]).unwrap_err().contains("truncated"));
    }

    #[test]
    fn checkpoint_zip_empty_archive() {
        let mut eocd = EOCD_SIG.to_le_bytes().to_vec();
        eocd.extend([0u8; 18]);
        assert!(entries(&eocd).unwrap().is_empty());
    }
}
