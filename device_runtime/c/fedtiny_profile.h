/* Where a node's instructions go, by part (idle, protocol, crypto, training), for the instruction-count plugin
 * (tools/insn_count.c, `part=` and `dump=` arguments): entering or leaving a part calls that part's marker
 * function, and the plugin counts every instruction to the part whose marker ran last. Nothing is timed on the
 * device; the counts are exact and identical from run to run.
 *
 * Library code (fedtiny_envelope.c, the session) marks its parts with FEDTINY_PROFILE_ENTER/LEAVE, which are
 * empty unless the firmware is built with -DFEDTINY_PROFILE (the node firmware is), so host builds and other
 * firmwares carry no trace of it. */
#ifndef FEDTINY_PROFILE_H
#define FEDTINY_PROFILE_H

enum { FEDTINY_PART_IDLE = 0, FEDTINY_PART_PROTOCOL = 1, FEDTINY_PART_CRYPTO = 2, FEDTINY_PART_TRAINING = 3,
       FEDTINY_PART_COUNT = 4 };

#ifdef FEDTINY_PROFILE
void fedtiny_profile_enter(int part); /* nests: leave() returns to the part that was running */
void fedtiny_profile_leave(void);
void fedtiny_profile_dump(void);      /* the plugin appends the counts so far to its output file */
#define FEDTINY_PROFILE_ENTER(part) fedtiny_profile_enter(part)
#define FEDTINY_PROFILE_LEAVE() fedtiny_profile_leave()
#else
#define FEDTINY_PROFILE_ENTER(part) ((void)0)
#define FEDTINY_PROFILE_LEAVE() ((void)0)
#endif

#endif
