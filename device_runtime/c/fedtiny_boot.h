/* Start-up shared by the firmwares: see fedtiny_boot.c. */
#ifndef FEDTINY_BOOT_H
#define FEDTINY_BOOT_H

void fedtiny_mark_begin(void);
void fedtiny_mark_end(void);

#endif
