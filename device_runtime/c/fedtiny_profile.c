/* The part stack behind fedtiny_profile.h: one marker function per part, which the plugin recognises by address. */
#include "fedtiny_profile.h"

#include <stdint.h>

#define DEPTH 8

/* Distinct bodies keep the compiler from merging the markers (the plugin tells them apart by address). */
volatile uint32_t fedtiny_profile_marker;
__attribute__((noinline)) void fedtiny_part_idle(void) { fedtiny_profile_marker = 10u; }
__attribute__((noinline)) void fedtiny_part_protocol(void) { fedtiny_profile_marker = 11u; }
__attribute__((noinline)) void fedtiny_part_crypto(void) { fedtiny_profile_marker = 12u; }
__attribute__((noinline)) void fedtiny_part_training(void) { fedtiny_profile_marker = 13u; }
__attribute__((noinline)) void fedtiny_profile_dump(void) { fedtiny_profile_marker = 14u; }

static void (*const markers[FEDTINY_PART_COUNT])(void) = {
    fedtiny_part_idle, fedtiny_part_protocol, fedtiny_part_crypto, fedtiny_part_training,
};
static uint8_t stack[DEPTH];
static uint32_t depth;

void fedtiny_profile_enter(int part)
{
    if (depth < DEPTH) {
        stack[depth] = (uint8_t)part;
    }
    depth++;
    markers[part]();
}

void fedtiny_profile_leave(void)
{
    if (depth > 0) {
        depth--;
    }
    markers[depth > 0 && depth <= DEPTH ? stack[depth - 1] : FEDTINY_PART_IDLE]();
}
