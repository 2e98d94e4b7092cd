/* Test firmware for the persisted state under QEMU (tests/test_cstore.py kills it at random points):
 * the flash is fedtiny_flash.bin in QEMU's working directory, reached through semihosting.
 *
 * At start it loads the newest record and checks that it is the one its generation names (the content of
 * record G is a function of G: three segments whose lengths and bytes come from xorshift32 seeded by G), then
 * saves records G+1, G+2, ... up to FIRMWARE_SAVES of them. It prints, flushed line by line:
 *     "empty" | "lost" | "loaded G" | "loaded-bad G" | "load failed REASON"   once, then
 *     "saved G"   after each save has returned, and "done" at the end (exit 0; 1 on any failure). */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "fedtiny_flash_semihost.h"
#include "fedtiny_store.h"

#define BANK_SIZE (16u * 1024u)
#define PROGRAM_UNIT 8u
#define FIRMWARE_SAVES 300u
#define SEGMENTS 3u

static const uint32_t max_length[SEGMENTS] = {4000u, 700u, 11000u}; /* at most the bank's capacity in all */
static uint8_t expected[SEGMENTS][11000];
static uint8_t loaded[SEGMENTS][11000];
static uint32_t expected_length[SEGMENTS];
static fedtiny_flash_semihost flash;
static fedtiny_store store;

static uint32_t xorshift32(uint32_t *state)
{
    uint32_t x = *state;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    *state = x;
    return x;
}

/* Record G's content (tests/test_cstore.py computes the same in Python). */
static void content(uint32_t generation)
{
    uint32_t state = generation * 2654435761u + 1u, i, j;
    for (i = 0; i < SEGMENTS; i++) {
        expected_length[i] = xorshift32(&state) % (max_length[i] + 1u);
        for (j = 0; j < expected_length[i]; j++) {
            expected[i][j] = (uint8_t)xorshift32(&state);
        }
    }
}

static void say(const char *what, uint32_t generation)
{
    printf("%s %lu\n", what, (unsigned long)generation);
    fflush(stdout);
}

int main(void)
{
    fedtiny_store_record record;
    fedtiny_store_segment segments[SEGMENTS];
    fedtiny_store_buffer buffers[SEGMENTS];
    uint32_t i, n;
    int status;

    if (fedtiny_flash_semihost_open(&flash, "fedtiny_flash.bin", BANK_SIZE, 2u, PROGRAM_UNIT) != 0) {
        printf("flash open failed\n");
        return 1;
    }
    status = fedtiny_store_open(&store, &flash.flash, &record);
    if (status == FEDTINY_STORE_OK) {
        int same = 1;
        for (i = 0; i < SEGMENTS; i++) {
            buffers[i].data = loaded[i];
            buffers[i].capacity = sizeof loaded[i];
        }
        status = fedtiny_store_load(&store, buffers, SEGMENTS);
        if (status != FEDTINY_STORE_OK) {
            printf("load failed %s\n", fedtiny_store_reason(status));
            return 1;
        }
        content(record.generation);
        for (i = 0; i < SEGMENTS; i++) {
            same &= buffers[i].length == expected_length[i] && memcmp(loaded[i], expected[i], expected_length[i]) == 0;
        }
        say(same ? "loaded" : "loaded-bad", record.generation);
    } else if (status == FEDTINY_STORE_EMPTY || status == FEDTINY_STORE_LOST) {
        printf("%s\n", fedtiny_store_reason(status));
        fflush(stdout);
    } else {
        printf("open failed %s\n", fedtiny_store_reason(status));
        return 1;
    }

    for (n = 0; n < FIRMWARE_SAVES; n++) {
        uint32_t generation = store.status == FEDTINY_STORE_OK ? store.newest.generation + 1u : 1u;
        content(generation);
        for (i = 0; i < SEGMENTS; i++) {
            segments[i].data = expected[i];
            segments[i].length = expected_length[i];
        }
        status = fedtiny_store_save(&store, segments, SEGMENTS);
        if (status != FEDTINY_STORE_OK || store.newest.generation != generation) {
            printf("save failed %s\n", fedtiny_store_reason(status));
            return 1;
        }
        say("saved", generation);
    }
    fedtiny_flash_semihost_close(&flash);
    printf("done\n");
    return 0;
}
