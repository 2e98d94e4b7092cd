/* Flash in a host file through ARM semihosting: see fedtiny_flash_semihost.h. */
#include "fedtiny_flash_semihost.h"

#include <string.h>

#if !defined(__arm__)
#error "fedtiny_flash_semihost.c needs an ARM target with semihosting (bkpt 0xAB); host builds use fedtiny_flash_ram.c"
#endif

/* Semihosting operations (ARM "Semihosting for AArch32 and AArch64", 2.0) and SYS_OPEN modes. */
enum {
    SYS_OPEN = 0x01, SYS_CLOSE = 0x02, SYS_WRITE = 0x05, SYS_READ = 0x06, SYS_SEEK = 0x0A, SYS_FLEN = 0x0C,
    SYS_ERRNO = 0x13
};
enum { HOST_ENOENT = 2 }; /* the host's errno for a missing file (Linux, macOS) */
enum { MODE_READ_WRITE = 3 /* "r+b" */, MODE_CREATE = 7 /* "w+b" */ };
#define CHUNK FEDTINY_FLASH_SEMIHOST_CHUNK

static int semihost(int operation, const void *arguments)
{
    register int r0 __asm__("r0") = operation;
    register const void *r1 __asm__("r1") = arguments;
    __asm__ volatile("bkpt 0xAB" : "+r"(r0) : "r"(r1) : "memory");
    return r0;
}

static uint32_t word(const void *p) { return (uint32_t)(uintptr_t)p; }

static int file_seek(int handle, uint32_t position)
{
    uint32_t args[2] = {(uint32_t)handle, position};
    return semihost(SYS_SEEK, args) == 0 ? 0 : -1;
}

/* SYS_WRITE and SYS_READ return the number of bytes NOT transferred. */
static int file_write(int handle, const uint8_t *data, uint32_t length)
{
    uint32_t args[3] = {(uint32_t)handle, word(data), length};
    return semihost(SYS_WRITE, args) == 0 ? 0 : -1;
}

static int file_read(int handle, uint8_t *out, uint32_t length)
{
    uint32_t args[3] = {(uint32_t)handle, word(out), length};
    return semihost(SYS_READ, args) == 0 ? 0 : -1;
}

static int fs_read(void *context, uint32_t offset, uint8_t *out, uint32_t length)
{
    const fedtiny_flash_semihost *fs = (const fedtiny_flash_semihost *)context;
    uint64_t region = (uint64_t)fs->flash.bank_size * fs->flash.bank_count;
    if (fs->handle < 0 || out == NULL || (uint64_t)offset + length > region) {
        return -1;
    }
    if (length == 0u) {
        return 0;
    }
    return file_seek(fs->handle, offset) == 0 ? file_read(fs->handle, out, length) : -1;
}

/* Write 0xFF over [offset, offset + length) of the file. */
static int fill_erased(int handle, uint32_t offset, uint32_t length)
{
    uint8_t erased[CHUNK];
    memset(erased, 0xFF, sizeof erased);
    if (file_seek(handle, offset) != 0) {
        return -1;
    }
    while (length > 0u) {
        uint32_t n = length < CHUNK ? length : CHUNK;
        if (file_write(handle, erased, n) != 0) {
            return -1;
        }
        length -= n;
    }
    return 0;
}

static int fs_erase(void *context, uint32_t bank)
{
    const fedtiny_flash_semihost *fs = (const fedtiny_flash_semihost *)context;
    if (fs->handle < 0 || bank >= fs->flash.bank_count) {
        return -1;
    }
    return fill_erased(fs->handle, bank * fs->flash.bank_size, fs->flash.bank_size);
}

/* Chunk by chunk: read what the flash holds, refuse a bit from 0 to 1, write. */
static int fs_program(void *context, uint32_t offset, const uint8_t *data, uint32_t length)
{
    const fedtiny_flash_semihost *fs = (const fedtiny_flash_semihost *)context;
    uint32_t unit = fs->flash.program_unit, done = 0u, i;
    uint64_t region = (uint64_t)fs->flash.bank_size * fs->flash.bank_count;
    uint8_t old[CHUNK];
    if (fs->handle < 0 || data == NULL || (uint64_t)offset + length > region || offset % unit != 0u ||
        length % unit != 0u) {
        return -1;
    }
    while (done < length) {
        uint32_t n = length - done < CHUNK ? length - done : CHUNK;
        if (fs_read(context, offset + done, old, n) != 0) {
            return -1;
        }
        for (i = 0; i < n; i++) {
            if ((old[i] & data[done + i]) != data[done + i]) {
                return -1;
            }
        }
        if (file_seek(fs->handle, offset + done) != 0 || file_write(fs->handle, data + done, n) != 0) {
            return -1;
        }
        done += n;
    }
    return 0;
}

int fedtiny_flash_semihost_open(fedtiny_flash_semihost *fs, const char *path, uint32_t bank_size,
                                uint32_t bank_count, uint32_t program_unit)
{
    uint32_t args[3];
    int length;
    if (fs == NULL || path == NULL) {
        return -1;
    }
    fs->handle = -1;
    fs->flash.context = fs;
    fs->flash.bank_size = bank_size;
    fs->flash.bank_count = bank_count;
    fs->flash.program_unit = program_unit;
    fs->flash.erase = fs_erase;
    fs->flash.program = fs_program;
    fs->flash.read = fs_read;
    if (fedtiny_store_capacity(&fs->flash, 0u) == 0u) {
        return -1;
    }
    args[0] = word(path);
    args[1] = MODE_READ_WRITE;
    args[2] = (uint32_t)strlen(path);
    fs->handle = semihost(SYS_OPEN, args);
    if (fs->handle < 0) {
        /* Only a missing file is a new, erased flash: "w+b" truncates, so never on any other failure. */
        if (semihost(SYS_ERRNO, NULL) != HOST_ENOENT) {
            return -1;
        }
        args[1] = MODE_CREATE;
        fs->handle = semihost(SYS_OPEN, args);
        if (fs->handle < 0) {
            return -1;
        }
    }
    args[0] = (uint32_t)fs->handle;
    length = semihost(SYS_FLEN, args);
    if (length < 0 || ((uint32_t)length < bank_size * bank_count &&
                       fill_erased(fs->handle, (uint32_t)length, bank_size * bank_count - (uint32_t)length) != 0)) {
        fedtiny_flash_semihost_close(fs);
        return -1;
    }
    return 0;
}

void fedtiny_flash_semihost_close(fedtiny_flash_semihost *fs)
{
    if (fs != NULL && fs->handle >= 0) {
        uint32_t args[1] = {(uint32_t)fs->handle};
        semihost(SYS_CLOSE, args);
        fs->handle = -1;
    }
}
