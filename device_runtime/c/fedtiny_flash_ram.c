/* A checked flash in RAM with power cuts: see fedtiny_flash_ram.h. */
#include "fedtiny_flash_ram.h"

#include <string.h>

#define GARBLE_PATTERN 0xA5u

static int ram_erase(void *context, uint32_t bank)
{
    fedtiny_flash_ram *ram = (fedtiny_flash_ram *)context;
    uint32_t size = ram->flash.bank_size, units = size / ram->flash.program_unit;
    uint8_t *start = ram->memory + (uint64_t)bank * size;
    if (ram->dead || bank >= ram->flash.bank_count) {
        return -1;
    }
    if (ram->erases_left == 0) {
        uint32_t from = ram->erase_from < size ? ram->erase_from : size;
        uint32_t length = ram->erase_length < size - from ? ram->erase_length : size - from;
        memset(start + from, 0xFF, length);
        memset(ram->programmed + (uint64_t)bank * units, 1, units);
        ram->dead = 1;
        return -1;
    }
    if (ram->erases_left > 0) {
        ram->erases_left--;
    }
    memset(start, 0xFF, size);
    memset(ram->programmed + (uint64_t)bank * units, 0, units);
    ram->erases++;
    return 0;
}

static int ram_program(void *context, uint32_t offset, const uint8_t *data, uint32_t length)
{
    fedtiny_flash_ram *ram = (fedtiny_flash_ram *)context;
    uint32_t unit = ram->flash.program_unit, i, apply;
    uint64_t end = (uint64_t)offset + length, region = (uint64_t)ram->flash.bank_size * ram->flash.bank_count;
    if (ram->dead || data == NULL || end > region || offset % unit != 0u || length % unit != 0u) {
        return -1;
    }
    for (i = 0; i < length; i++) {
        if ((ram->memory[offset + i] & data[i]) != data[i]) {
            return -1; /* a bit would have to go from 0 to 1 */
        }
    }
    for (i = 0; i < length; i += unit) {
        if (ram->programmed[(offset + i) / unit]) {
            return -1;
        }
    }
    apply = length;
    if (ram->program_left >= 0 && (uint64_t)ram->program_left < length) {
        apply = (uint32_t)ram->program_left;
    }
    for (i = 0; i < apply; i++) {
        ram->memory[offset + i] &= data[i];
    }
    for (i = 0; i < apply; i += unit) {
        ram->programmed[(offset + i) / unit] = 1; /* every unit touched, also the one torn below */
    }
    ram->bytes_programmed += apply;
    if (apply < length) {
        if (ram->garble) {
            uint32_t unit_end = (apply / unit + 1u) * unit;
            for (i = apply; i < unit_end; i++) {
                ram->memory[offset + i] &= (uint8_t)(data[i] | GARBLE_PATTERN);
            }
        }
        ram->programmed[(offset + apply) / unit] = 1;
        ram->program_left = 0;
        ram->dead = 1;
        return -1;
    }
    if (ram->program_left >= 0) {
        ram->program_left -= length;
    }
    return 0;
}

static int ram_read(void *context, uint32_t offset, uint8_t *out, uint32_t length)
{
    fedtiny_flash_ram *ram = (fedtiny_flash_ram *)context;
    uint64_t region = (uint64_t)ram->flash.bank_size * ram->flash.bank_count;
    if (ram->dead || out == NULL || (uint64_t)offset + length > region) {
        return -1;
    }
    memcpy(out, ram->memory + offset, length);
    return 0;
}

int fedtiny_flash_ram_init(fedtiny_flash_ram *ram, uint8_t *memory, uint8_t *programmed, uint32_t bank_size,
                           uint32_t bank_count, uint32_t program_unit)
{
    if (ram == NULL || memory == NULL || programmed == NULL) {
        return -1;
    }
    memset(ram, 0, sizeof *ram);
    ram->flash.context = ram;
    ram->flash.bank_size = bank_size;
    ram->flash.bank_count = bank_count;
    ram->flash.program_unit = program_unit;
    ram->flash.erase = ram_erase;
    ram->flash.program = ram_program;
    ram->flash.read = ram_read;
    if (fedtiny_store_capacity(&ram->flash, 0u) == 0u) {
        return -1;
    }
    ram->memory = memory;
    ram->programmed = programmed;
    memset(memory, 0xFF, (size_t)bank_size * bank_count);
    memset(programmed, 0, (size_t)bank_size * bank_count / program_unit);
    fedtiny_flash_ram_revive(ram);
    return 0;
}

void fedtiny_flash_ram_cut(fedtiny_flash_ram *ram, int64_t program_bytes, int64_t erases, uint32_t erase_from,
                           uint32_t erase_length, int garble)
{
    ram->program_left = program_bytes;
    ram->erases_left = erases;
    ram->erase_from = erase_from;
    ram->erase_length = erase_length;
    ram->garble = garble;
}

void fedtiny_flash_ram_revive(fedtiny_flash_ram *ram)
{
    ram->dead = 0;
    fedtiny_flash_ram_cut(ram, -1, -1, 0u, 0u, 0);
}
