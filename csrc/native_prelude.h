#include "fastcdc.h"
#include "walk.h"
#include "writefile.h"
