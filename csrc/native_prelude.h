#include "fastcdc.h"
#include "patch.h"
#include "walk.h"
#include "writefile.h"
