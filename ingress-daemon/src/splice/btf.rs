//! Reads one struct member offset from the kernel's BTF (`/sys/kernel/btf/vmlinux`).
//!
//! The verdict program reads `tcp_sock.bytes_acked` of the peer socket with
//! `bpf_probe_read_kernel`, and the member's offset differs between kernels. The aya loader
//! does not expose BTF lookups, so this walks the type section directly: the format is a
//! header, a type section of variable-size records, and a string section (kernel
//! `Documentation/bpf/btf.rst`; stable since 5.x). Anonymous struct/union members are searched
//! recursively, adding their offsets.

use thiserror::Error;

/// Why a member offset could not be read.
#[derive(Debug, Error)]
pub enum BtfError {
    /// The BTF blob could not be read.
    #[error("cannot read kernel BTF at {path}: {source}")]
    Read {
        /// Path of the blob.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The blob is not BTF or is truncated.
    #[error("malformed kernel BTF: {reason}")]
    Malformed {
        /// What was wrong.
        reason: &'static str,
    },
    /// The struct or member is not in the blob.
    #[error("kernel BTF has no member {member} in struct {strukt}")]
    NotFound {
        /// The struct searched.
        strukt: String,
        /// The member searched.
        member: String,
    },
}

const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_ENUM64: u32 = 19;

struct Type<'a> {
    name_off: u32,
    kind: u32,
    kind_flag: bool,
    /// `size` or `type`, depending on the kind (the target of typedefs and qualifiers).
    size_type: u32,
    /// Trailing records (members for struct/union).
    extra: &'a [u8],
    vlen: usize,
}

struct Blob<'a> {
    types: Vec<Type<'a>>,
    strings: &'a [u8],
}

fn u32_at(data: &[u8], offset: usize) -> Result<u32, BtfError> {
    data.get(offset..offset + 4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes)
        .ok_or(BtfError::Malformed {
            reason: "truncated record",
        })
}

fn parse(data: &[u8]) -> Result<Blob<'_>, BtfError> {
    let magic = data.get(0..2).ok_or(BtfError::Malformed {
        reason: "too short",
    })?;
    if magic != [0x9f, 0xeb] {
        return Err(BtfError::Malformed {
            reason: "bad magic (only little-endian BTF is supported)",
        });
    }
    let hdr_len = u32_at(data, 4)? as usize;
    let type_off = u32_at(data, 8)? as usize;
    let type_len = u32_at(data, 12)? as usize;
    let str_off = u32_at(data, 16)? as usize;
    let str_len = u32_at(data, 20)? as usize;
    let section = |off: usize, len: usize| {
        data.get(hdr_len + off..hdr_len + off + len)
            .ok_or(BtfError::Malformed {
                reason: "section out of bounds",
            })
    };
    let type_data = section(type_off, type_len)?;
    let strings = section(str_off, str_len)?;
    // Type IDs start at 1; slot 0 is `void`.
    let mut types = vec![Type {
        name_off: 0,
        kind: 0,
        kind_flag: false,
        size_type: 0,
        extra: &[],
        vlen: 0,
    }];
    let mut pos = 0;
    while pos < type_data.len() {
        let name_off = u32_at(type_data, pos)?;
        let info = u32_at(type_data, pos + 4)?;
        let size_type = u32_at(type_data, pos + 8)?;
        let vlen = (info & 0xffff) as usize;
        let kind = (info >> 24) & 0x1f;
        let extra_len = match kind {
            KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
            KIND_ARRAY => 12,
            KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * vlen,
            KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen,
            _ => 0,
        };
        let start = pos + 12;
        let extra = type_data
            .get(start..start + extra_len)
            .ok_or(BtfError::Malformed {
                reason: "type record out of bounds",
            })?;
        types.push(Type {
            name_off,
            kind,
            kind_flag: info >> 31 == 1,
            size_type,
            extra,
            vlen,
        });
        pos = start + extra_len;
    }
    Ok(Blob { types, strings })
}

impl Blob<'_> {
    fn name(&self, off: u32) -> &[u8] {
        let rest = self.strings.get(off as usize..).unwrap_or(&[]);
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        rest.get(..end).unwrap_or(&[])
    }

    /// Byte offset of `member` inside the struct/union with type id `id`, searching anonymous
    /// members recursively (bounded depth).
    fn member_offset(&self, id: usize, member: &[u8], depth: u32) -> Result<Option<u64>, BtfError> {
        let Some(ty) = self.types.get(id) else {
            return Ok(None);
        };
        if depth > 8 || !(ty.kind == KIND_STRUCT || ty.kind == KIND_UNION) {
            return Ok(None);
        }
        for i in 0..ty.vlen {
            let name_off = u32_at(ty.extra, i * 12)?;
            let type_id = u32_at(ty.extra, i * 12 + 4)? as usize;
            let raw_offset = u32_at(ty.extra, i * 12 + 8)?;
            // With kind_flag set, the low 24 bits are the bit offset (the top 8 a bitfield size).
            let bit_offset = if ty.kind_flag {
                raw_offset & 0x00ff_ffff
            } else {
                raw_offset
            };
            let name = self.name(name_off);
            if name == member {
                if bit_offset % 8 != 0 {
                    return Err(BtfError::Malformed {
                        reason: "member is a bitfield",
                    });
                }
                return Ok(Some(u64::from(bit_offset / 8)));
            }
            if name.is_empty()
                && let Some(inner) = self.member_offset(self.resolve(type_id), member, depth + 1)?
            {
                return Ok(Some(u64::from(bit_offset / 8) + inner));
            }
        }
        Ok(None)
    }

    /// Follows typedefs and qualifiers to the underlying type id.
    fn resolve(&self, mut id: usize) -> usize {
        for _ in 0..16 {
            match self.types.get(id) {
                // typedef, volatile, const, restrict, type_tag: `size_type` is the target.
                Some(ty) if matches!(ty.kind, 8..=11 | 18) => id = ty.size_type as usize,
                _ => return id,
            }
        }
        id
    }
}

/// Byte offset of `member` in `struct strukt`, from a BTF blob.
pub fn member_offset_in(data: &[u8], strukt: &str, member: &str) -> Result<u64, BtfError> {
    let blob = parse(data)?;
    let not_found = || BtfError::NotFound {
        strukt: strukt.to_owned(),
        member: member.to_owned(),
    };
    for (id, ty) in blob.types.iter().enumerate() {
        if ty.kind == KIND_STRUCT && blob.name(ty.name_off) == strukt.as_bytes() {
            return blob
                .member_offset(id, member.as_bytes(), 0)?
                .ok_or_else(not_found);
        }
    }
    Err(not_found())
}

/// Byte offset of `member` in `struct strukt` of the running kernel.
pub fn kernel_member_offset(strukt: &str, member: &str) -> Result<u64, BtfError> {
    let path = "/sys/kernel/btf/vmlinux";
    let data = std::fs::read(path).map_err(|source| BtfError::Read {
        path: path.to_owned(),
        source,
    })?;
    member_offset_in(&data, strukt, member)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_tcp_sock_bytes_acked_in_running_kernel() {
        let Ok(data) = std::fs::read("/sys/kernel/btf/vmlinux") else {
            eprintln!("skipped: no kernel BTF on this machine");
            return;
        };
        let acked = member_offset_in(&data, "tcp_sock", "bytes_acked").unwrap();
        let received = member_offset_in(&data, "tcp_sock", "bytes_received").unwrap();
        // Both are u64 members well inside the struct, after `struct inet_connection_sock`.
        assert!(acked > 1000 && acked < 4096, "offset {acked}");
        assert_eq!(acked % 8, 0);
        assert_ne!(acked, received);
    }

    #[test]
    fn reports_missing_member_and_garbage() {
        assert!(matches!(
            member_offset_in(b"not btf at all, not at all....", "tcp_sock", "x"),
            Err(BtfError::Malformed { .. })
        ));
        if let Ok(data) = std::fs::read("/sys/kernel/btf/vmlinux") {
            assert!(matches!(
                member_offset_in(&data, "tcp_sock", "no_such_member"),
                Err(BtfError::NotFound { .. })
            ));
        }
        // Every truncation of a real blob is an error, never a panic.
        if let Ok(data) = std::fs::read("/sys/kernel/btf/vmlinux") {
            for cut in [0, 1, 7, 24, 100, data.len() / 2] {
                assert!(member_offset_in(&data[..cut], "tcp_sock", "bytes_acked").is_err());
            }
        }
    }
}
