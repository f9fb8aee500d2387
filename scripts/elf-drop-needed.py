#!/usr/bin/env python3
# Makes a shared library stop needing some of its DT_NEEDED libraries (scripts/package.sh: the CUDA
# wheel's libtorch_cpu.so needs libcudart and libcupti only for its profiler's CUDA hooks).
#
# patchelf --remove-needed / --replace-needed change DT_NEEDED but leave the old library's version
# requirement (.gnu.version_r), and glibc's loader then aborts ("_dl_check_map_versions: Assertion
# `needed != NULL'"). This script, run after patchelf, unlinks those version-requirement entries and
# marks the symbols that used them unversioned, so they bind to whichever loaded library defines them
# unversioned or with a default version: package.sh's libdesam_nocuda.so stubs. Every such symbol must
# be an undefined function; the script checks that.
#
# Usage: elf-drop-needed.py LIBRARY SONAME [SONAME...]   (edits LIBRARY in place; x86-64 ELF only)
import struct
import sys

SHT_DYNSYM, SHT_GNU_VERNEED, SHT_GNU_VERSYM, SHT_DYNAMIC = 11, 0x6FFFFFFE, 0x6FFFFFFF, 6
DT_VERNEEDNUM = 0x6FFFFFFF
STT_FUNC, SHN_UNDEF = 2, 0


def main(path, sonames):
    data = bytearray(open(path, "rb").read())
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        sys.exit(f"{path}: not a 64-bit little-endian ELF file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    sections = []
    for i in range(shnum):
        name, typ, _flags, _addr, off, size, link, info, _align, entsize = struct.unpack_from(
            "<IIQQQQIIQQ", data, shoff + i * shentsize)
        sections.append(dict(index=i, type=typ, off=off, size=size, link=link, info=info, entsize=entsize,
                             hdr=shoff + i * shentsize))
    by_type = {s["type"]: s for s in sections}
    verneed, versym, dynsym, dynamic = (by_type.get(t) for t in (SHT_GNU_VERNEED, SHT_GNU_VERSYM, SHT_DYNSYM,
                                                                  SHT_DYNAMIC))
    if verneed is None:
        return  # no version requirements: patchelf's work is enough
    strtab = sections[verneed["link"]]

    def cstr(off):
        start = strtab["off"] + off
        return bytes(data[start:data.index(0, start)]).decode()

    # Walk the Verneed chain; unlink entries naming a dropped library, remember their version indices.
    dropped_indices, kept, prev, pos = set(), 0, None, verneed["off"]
    while True:
        _ver, cnt, file_off, aux_off, next_off = struct.unpack_from("<HHIII", data, pos)
        if cstr(file_off) in sonames:
            aux = pos + aux_off
            for _ in range(cnt):
                _hash, _flags, other, _name, aux_next = struct.unpack_from("<IHHII", data, aux)
                dropped_indices.add(other)
                aux += aux_next
            if prev is None:
                sys.exit(f"{path}: {cstr(file_off)} is the first version requirement; not handled")
            # The previous entry now jumps over this one (or ends the chain where this one did).
            new_next = 0 if next_off == 0 else (pos - prev) + next_off
            struct.pack_into("<I", data, prev + 12, new_next)
        else:
            kept += 1
            prev = pos
        if next_off == 0:
            break
        pos += next_off
    if not dropped_indices:
        return
    # sh_info and DT_VERNEEDNUM count the entries (readelf and other tools read them).
    struct.pack_into("<I", data, verneed["hdr"] + 44, kept)
    for d in range(dynamic["off"], dynamic["off"] + dynamic["size"], 16):
        tag, _val = struct.unpack_from("<qQ", data, d)
        if tag == DT_VERNEEDNUM:
            struct.pack_into("<Q", data, d + 8, kept)
    # Symbols versioned by a dropped requirement become unversioned (index 1: global).
    dynstr = sections[dynsym["link"]]
    cleared = []
    for i in range(dynsym["size"] // dynsym["entsize"]):
        ndx_pos = versym["off"] + 2 * i
        ndx, = struct.unpack_from("<H", data, ndx_pos)
        if ndx & 0x7FFF in dropped_indices:
            name_off, info, _other, shndx, _value, _size = struct.unpack_from("<IBBHQQ", data,
                                                                               dynsym["off"] + i * 24)
            name_start = dynstr["off"] + name_off
            name = bytes(data[name_start:data.index(0, name_start)]).decode()
            if shndx != SHN_UNDEF or info & 0xF != STT_FUNC:
                sys.exit(f"{path}: {name} from a dropped library is not an undefined function; refusing")
            struct.pack_into("<H", data, ndx_pos, 1)
            cleared.append(name)
    open(path, "wb").write(data)
    print(f"elf-drop-needed: {path}: dropped {', '.join(sorted(sonames))}; {len(cleared)} functions"
          f" now unversioned", file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__ or "usage: elf-drop-needed.py LIBRARY SONAME [SONAME...]")
    main(sys.argv[1], set(sys.argv[2:]))
