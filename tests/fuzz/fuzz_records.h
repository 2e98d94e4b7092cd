/* Inputs that carry several frames (a downlink sequence for the reassembler or the session): records of
 *     tag u8 | length u16 little-endian | length bytes
 * where a last record shorter than its length takes what is left. tests/fuzz/run_c_fuzz.py writes the seeds in
 * this form (records()). Harness code: it may use malloc, the library code it drives may not. */
#ifndef FUZZ_RECORDS_H
#define FUZZ_RECORDS_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    const uint8_t *next;
    size_t left;
} fuzz_records;

/* 1 and the next record, or 0 at the end of the input. */
static int fuzz_record(fuzz_records *in, uint8_t *tag, const uint8_t **bytes, size_t *length)
{
    size_t n;
    if (in->left < 3u) {
        return 0;
    }
    *tag = in->next[0];
    n = (size_t)in->next[1] | ((size_t)in->next[2] << 8);
    in->next += 3;
    in->left -= 3;
    if (n > in->left) {
        n = in->left;
    }
    *bytes = in->next;
    *length = n;
    in->next += n;
    in->left -= n;
    return 1;
}

#endif
