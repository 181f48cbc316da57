"""Zero the cubins of every GPU architecture but one in a CUDA shared library's .nv_fatbin section.

    python prune_fatbin.py libonnxruntime_providers_cuda.so out.so 90

Used to carry onnxruntime-gpu 1.31.1 to the H200 machine within the 64 MiB a device call may send:
the file keeps its size and layout (headers untouched, only the payloads of other architectures'
ELF entries are zeroed), so it compresses from 185 MB (zstd) to 52 MB; the driver loads only the
entry of the device's architecture. The result runs ONLY on that architecture (sm_90 = H100/H200).
Fatbin layout (public reverse-engineering of the format): a header (magic 0xBA55ED50, version,
header size, fat size) followed by entries (kind 1 = PTX, 2 = ELF; header size; payload size;
architecture at offset 28).
"""
import struct, sys
src, dst, keep = sys.argv[1], sys.argv[2], int(sys.argv[3])
data = bytearray(open(src,'rb').read())
e_shoff, = struct.unpack_from('<Q', data, 0x28)
e_shentsize, e_shnum, e_shstrndx = struct.unpack_from('<HHH', data, 0x3A)
secs = [struct.unpack_from('<IIQQQQ', data, e_shoff + i*e_shentsize) for i in range(e_shnum)]
stroff = secs[e_shstrndx][4]
def nm(n): return bytes(data[stroff+n:data.index(b'\0', stroff+n)]).decode()
fs = [s for s in secs if nm(s[0]) == '.nv_fatbin'][0]
off, end = fs[4], fs[4]+fs[5]
zeroed = 0
while off < end:
    magic, ver, hsize, fsize = struct.unpack_from('<IHHQ', data, off)
    if magic != 0xBA55ED50:
        off += 8; continue
    e = off + hsize; fend = off + hsize + fsize
    while e < fend:
        kind, unk, ehsize, psize = struct.unpack_from('<HHIQ', data, e)
        arch, = struct.unpack_from('<I', data, e+28)
        if kind == 2 and arch != keep:
            data[e+ehsize:e+ehsize+psize] = bytes(psize); zeroed += psize
        e += ehsize + psize
    off = fend
open(dst,'wb').write(data)
print('zeroed MB', zeroed/1e6)
